"""Mail storage, free of Twisted: the Maildir store, and a read-only survey of it for the
lab view.  (The outbound queue is relay/queue.py, Twisted-free too.)"""
