"""Mail storage, free of Twisted: the Maildir store (and, next, the outbound queue)."""
