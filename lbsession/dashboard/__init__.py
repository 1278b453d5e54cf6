"""The live dashboard the balancer's admin listener serves: a static page, its event stream and demo users.

The page (static/, plain HTML, SVG and JavaScript, no build step, nothing from
a CDN) draws clients, the balancer, the servers and the session store, polls
`/status` and `/topology`, and animates every request it reads from `/events`.
"""
