"""The load balancer: a raw asyncio HTTP/1.1 proxy, its upstream pool and its admin API."""

from lbsession.balancer.compiled import install

# Before any hot module is imported: the compiled build when installed and current, else the pure sources.
install()
