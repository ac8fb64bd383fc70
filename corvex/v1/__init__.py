"""Generated protobuf and gRPC stubs of the corvex.v1 API (see proto/). Do not edit."""
