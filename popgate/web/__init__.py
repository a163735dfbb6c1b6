"""The live lab dashboard: sessions and Maildirs as they change, on twisted.web."""
