"""The wire layer: gRPC servicers, protobuf <-> numpy conversion, the status map, health,
authentication and TLS. The only part of the server that imports the generated protobuf code."""
