"""The queue on a storage root (docs/contract.md §1-3): where things are (layout), the records read
(jobfiles), what status makes of them (views), the idle poll's memory (polling), the job
lifecycle's transitions (lifecycle) and the owner's fenced writes (owner)."""
