"""lbsession: a hands-on lab of the session problem behind a load balancer."""

__version__ = "0.1.0"
