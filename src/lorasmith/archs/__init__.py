"""Built-in model families, each a plugin module registering one :class:`Architecture` subclass."""
