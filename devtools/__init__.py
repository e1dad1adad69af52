"""Development-time tooling (not shipped): find or start the services the two commands need."""
