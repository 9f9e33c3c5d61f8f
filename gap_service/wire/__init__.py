"""gap.v1 on the wire, shared by the server and the clients: the generated protobuf modules
(pb.py, generated from protos/ by protogen.py) and the conversions between messages and the
library's types (tensors.py, messages.py). Nothing here runs a model or opens a connection."""
