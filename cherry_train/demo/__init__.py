"""`cherry demo`: synthetic cherries -> a job submitted -> a worker trains it -> results."""
