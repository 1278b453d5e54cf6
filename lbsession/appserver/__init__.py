"""The demo app server (WAS): login, me, logout, cart, healthz, over a pluggable session store."""
