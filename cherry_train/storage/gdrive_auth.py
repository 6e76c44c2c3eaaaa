"""Credentials for the Drive API backend, in this order:

1. $CHERRY_DRIVE_TOKEN: a plain OAuth access token (scripts, CI; it expires after an hour and
   cannot be refreshed, which the error then says).
2. On Colab: Colab's own sign-in (`google.colab.auth.authenticate_user()`), no files involved.
3. On a laptop: the token saved by `cherry drive login` (installed-app OAuth flow from your
   client-secrets file), refreshed when it expires and saved again, readable only by you (0600).

Scope: full Drive (`auth/drive`). The narrower `drive.file` scope only shows files this app
created, and a worker must read the data folders and the queue folder you made yourself.
Nothing here logs a token: errors name the source of the credentials, never their content.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cherry_train import files
from cherry_train.places import config_dir, on_colab
from cherry_train.storage.gdrive_api import AUTH_HINT, SCOPE, DriveAuthError

HTTP_TIMEOUT_SECONDS = 120


def token_path() -> Path:
    return config_dir() / "drive-token.json"


def _missing_library() -> DriveAuthError:
    return DriveAuthError("the gdrive: root needs the Google API client: "
                          "pip install 'cherry-train[drive]'")


def credentials():
    """The credentials to use, or DriveAuthError with what to do."""
    try:
        import google.oauth2.credentials as oauth
    except ImportError:
        raise _missing_library() from None
    token = os.environ.get("CHERRY_DRIVE_TOKEN")
    if token:
        return oauth.Credentials(token=token.strip())
    if on_colab():
        return _colab_credentials()
    path = token_path()
    if not path.is_file():
        raise DriveAuthError(f"no Drive credentials on this machine: {AUTH_HINT}")
    try:
        creds = oauth.Credentials.from_authorized_user_file(str(path), [SCOPE])
    except (ValueError, KeyError) as e:
        raise DriveAuthError(f"the saved Drive token {path} is unreadable ({e}): "
                             f"{AUTH_HINT}") from None
    if not creds.valid:
        _refresh(creds, path)
    return creds


def _colab_credentials():
    import google.auth
    from google.colab import auth  # type: ignore[import-not-found]

    auth.authenticate_user()
    creds, _ = google.auth.default(scopes=[SCOPE])
    return creds


def _refresh(creds, path: Path) -> None:
    import google_auth_httplib2
    import httplib2
    from google.auth.exceptions import RefreshError, TransportError

    if not creds.refresh_token:
        raise DriveAuthError(f"the saved Drive token {path} has expired: {AUTH_HINT}")
    try:
        creds.refresh(google_auth_httplib2.Request(httplib2.Http(timeout=HTTP_TIMEOUT_SECONDS)))
    except RefreshError:
        raise DriveAuthError(f"the saved Drive token {path} was revoked or has expired: "
                             f"{AUTH_HINT}") from None
    except TransportError as e:
        raise DriveAuthError(f"the saved Drive token {path} needs a refresh, and Google's token "
                             f"service is unreachable ({type(e).__name__}); check the network"
                             ) from None
    save_token(creds.to_json(), path)


def save_token(token_json: str, path: Path | None = None) -> Path:
    """Write the token readable by its owner only, atomically (never briefly world-readable)."""
    path = path or token_path()
    files.write_atomic(path, token_json.encode(), mode=0o600)
    return path


def login(client_secrets: Path, open_browser: bool = True) -> Path:
    """The installed-app OAuth flow: a browser asks you to allow access, a local redirect
    receives the answer, and the token (with its refresh token) is saved for later runs."""
    try:
        from google_auth_oauthlib.flow import InstalledAppFlow
    except ImportError:
        raise _missing_library() from None
    try:
        secrets = json.loads(Path(client_secrets).read_text())
    except (OSError, ValueError) as e:
        raise DriveAuthError(f"client secrets {client_secrets}: {e}") from None
    if "installed" not in secrets:
        raise DriveAuthError(f"client secrets {client_secrets}: not a 'Desktop app' OAuth client "
                             "(its JSON has no 'installed' key); create one as the README says")
    flow = InstalledAppFlow.from_client_config(secrets, scopes=[SCOPE])
    creds = flow.run_local_server(port=0, open_browser=open_browser,
                                  authorization_prompt_message="Open this URL to allow access: "
                                  "{url}", success_message="cherry-train can now use your "
                                  "Drive. You may close this tab.")
    return save_token(creds.to_json())


def http_factory(creds=None) -> Callable[[], Any]:
    """One authorized HTTP object per call (the storage makes one per thread)."""
    import google_auth_httplib2
    import httplib2

    creds = creds or credentials()

    def make():
        http = httplib2.Http(timeout=HTTP_TIMEOUT_SECONDS)
        # Drive answers "308 Resume Incomplete" during resumable uploads: not a redirect.
        http.redirect_codes = http.redirect_codes - {308}
        return google_auth_httplib2.AuthorizedHttp(creds, http=http)

    return make


def open_drive(folder: str):
    """The storage for a `gdrive:<folder>` root, with this machine's credentials."""
    try:
        from cherry_train.storage.gdrive import DriveStorage
    except ImportError:
        raise _missing_library() from None
    return DriveStorage(folder, http_factory(), endpoint=os.environ.get("CHERRY_DRIVE_ENDPOINT"))
