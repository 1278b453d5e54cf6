"""Session clustering: every app server keeps every session and replicates each change to its peers."""
