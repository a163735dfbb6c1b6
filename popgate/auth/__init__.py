"""Who may log in: users and password schemes, SASL mechanisms, login attempts with
their penalties; shared by every protocol that authenticates."""
