"""popgate benchmark suite: load generator, peer servers and the comparison driver.

Nothing here imports popgate: the servers are driven over loopback sockets only.
"""
