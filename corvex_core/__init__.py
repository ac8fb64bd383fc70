"""The Corvex core: engines, metering and the gRPC servicers that expose them."""
