"""The gRPC servicers: wire ⇄ domain only (see each module)."""
