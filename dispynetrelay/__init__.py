"""dispynetrelay: relays dispy discovery between a network of nodes and clients elsewhere."""
