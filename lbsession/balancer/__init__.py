"""The load balancer: a raw asyncio HTTP/1.1 proxy, its upstream pool and its admin API."""
