"""Outbound mail: the durable queue (queue.py, Twisted-free), the runner that retries it
(runner.py), the SMTP client to the next hop (client.py) and delivery status
notifications (dsn.py)."""
