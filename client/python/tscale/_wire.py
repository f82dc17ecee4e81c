"""Just enough of the protobuf wire format to talk to gRPC's health and reflection services.

Debian ships no grpc_health / grpc_reflection Python modules, so their few messages are encoded by
hand here:
  grpc.health.v1.HealthCheckRequest   { string service = 1; }
  grpc.health.v1.HealthCheckResponse  { ServingStatus status = 1; }
  grpc.reflection.v1alpha.ServerReflectionRequest  { string list_services = 7; ... }
  grpc.reflection.v1alpha.ServerReflectionResponse { ListServiceResponse list_services_response = 6;
                                                     ErrorResponse error_response = 7; ... }
  ListServiceResponse { repeated ServiceResponse service = 1; }  ServiceResponse { string name = 1; }
"""

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
REFLECTION_INFO = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"

HEALTH_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf, pos):
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def string_field(number, value):
    data = value.encode("utf-8")
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def fields(buf):
    """Yields (field number, wire type, value) of a serialized message; value is an int for
    varints and fixed-width fields, bytes for length-delimited ones."""
    buf = bytes(buf)
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wtype = key >> 3, key & 7
        if wtype == 0:
            value, pos = _read_varint(buf, pos)
        elif wtype == 1:
            value = int.from_bytes(buf[pos:pos + 8], "little")
            pos += 8
        elif wtype == 2:
            n, pos = _read_varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated length-delimited field")
            value = buf[pos:pos + n]
            pos += n
        elif wtype == 5:
            value = int.from_bytes(buf[pos:pos + 4], "little")
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wtype}")
        yield number, wtype, value


def health_request(service):
    return string_field(1, service) if service else b""


def health_status(response):
    """The ServingStatus name of a HealthCheckResponse."""
    status = 0
    for number, wtype, value in fields(response):
        if number == 1 and wtype == 0:
            status = value
    return HEALTH_STATUS.get(status, str(status))


def list_services_request():
    return string_field(7, "*")


def list_services(response):
    """The service names in a ServerReflectionResponse; raises ValueError for an error_response."""
    names = []
    for number, wtype, value in fields(response):
        if number == 6 and wtype == 2:
            for n2, w2, service in fields(value):
                if n2 == 1 and w2 == 2:
                    for n3, w3, name in fields(service):
                        if n3 == 1 and w3 == 2:
                            names.append(name.decode("utf-8"))
        elif number == 7 and wtype == 2:
            message = ""
            for n2, w2, v in fields(value):
                if n2 == 2 and w2 == 2:
                    message = v.decode("utf-8", "replace")
            raise ValueError(f"reflection error: {message}")
    return names
