"""popgate: SMTP pushes mail into per-user Maildirs, POP3 lets each user pull it out."""

__version__ = "0.1.0"
