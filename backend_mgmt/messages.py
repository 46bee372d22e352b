"""Protobuf messages of the handshake, ping and sleep protocols (see handshake.proto).

The classes are built from a descriptor at import time instead of from protoc's generated code:
generated code is tied to a protobuf runtime version, and the .deb must run on Debian's
python3-protobuf while developers may have a newer one from PyPI.
"""

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
_UINT32 = descriptor_pb2.FieldDescriptorProto.TYPE_UINT32
_BOOL = descriptor_pb2.FieldDescriptorProto.TYPE_BOOL
_ENUM = descriptor_pb2.FieldDescriptorProto.TYPE_ENUM
_OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
_REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED

# name -> [(field name, number, type, label)], exactly as in handshake.proto
_MESSAGES = {
    "Request": [("requested_model", 1, _STRING, _OPTIONAL)],
    "Response": [
        ("protocols", 1, _STRING, _REPEATED),
        ("model_ipc_endpoint", 2, _STRING, _OPTIONAL),
        ("error_message", 3, _STRING, _OPTIONAL),
    ],
    "Ping": [("correlation_id", 1, _UINT32, _OPTIONAL), ("message", 2, _STRING, _OPTIONAL)],
    "Pong": [("correlation_id", 1, _UINT32, _OPTIONAL), ("message", 2, _STRING, _OPTIONAL)],
    "Sleep": [("correlation_id", 1, _UINT32, _OPTIONAL),
              ("action", 2, (_ENUM, ".handshake.Sleep.Action"), _OPTIONAL)],
    "SleepState": [("correlation_id", 1, _UINT32, _OPTIONAL), ("asleep", 2, _BOOL, _OPTIONAL),
                   ("error_message", 3, _STRING, _OPTIONAL)],
}
# message name -> {enum name: [(value name, number)]}, nested as in handshake.proto
_ENUMS = {"Sleep": {"Action": [("SLEEP", 0), ("WAKE", 1), ("STATE", 2)]}}


def _build():
    file_proto = descriptor_pb2.FileDescriptorProto(
        name="backend_mgmt/handshake.proto", package="handshake", syntax="proto3")
    for message_name, fields in _MESSAGES.items():
        message_proto = file_proto.message_type.add(name=message_name)
        for enum_name, values in _ENUMS.get(message_name, {}).items():
            enum_proto = message_proto.enum_type.add(name=enum_name)
            for value_name, number in values:
                enum_proto.value.add(name=value_name, number=number)
        for field_name, number, field_type, label in fields:
            type_name = None
            if isinstance(field_type, tuple):            # (_ENUM, its full name)
                field_type, type_name = field_type
            message_proto.field.add(name=field_name, number=number, type=field_type, label=label,
                                    type_name=type_name)
    # A private pool, so an application that also loads its own handshake.proto does not clash.
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    classes = {}
    for message_name in _MESSAGES:
        descriptor = pool.FindMessageTypeByName("handshake." + message_name)
        if hasattr(message_factory, "GetMessageClass"):   # protobuf >= 4.22
            classes[message_name] = message_factory.GetMessageClass(descriptor)
        else:                                              # Debian bookworm's 3.21 / 4.21
            classes[message_name] = message_factory.MessageFactory(pool).GetPrototype(descriptor)
    return classes


_CLASSES = _build()
Request = _CLASSES["Request"]
Response = _CLASSES["Response"]
Ping = _CLASSES["Ping"]
Pong = _CLASSES["Pong"]
Sleep = _CLASSES["Sleep"]
SleepState = _CLASSES["SleepState"]

# Protocol names a backend may list in its handshake Response.
PING_PROTOCOL = "ping"
SLEEP_PROTOCOL = "sleep"
