from google.api import annotations_pb2 as _annotations_pb2
from genrpc.v1 import chat_pb2 as _chat_pb2
from genrpc.v1 import completion_pb2 as _completion_pb2
from genrpc.v1 import model_pb2 as _model_pb2
from genrpc.v1 import responses_pb2 as _responses_pb2
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor
