"""`tokenstream describe`: what a server offers, read through its reflection service."""

from __future__ import annotations

import contextlib

import click
import grpc
from google.protobuf import descriptor
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

# Scalar type numbers to their .proto names (TYPE_STRING -> string).
_SCALARS = {
    getattr(descriptor.FieldDescriptor, name): name.removeprefix("TYPE_").lower()
    for name in dir(descriptor.FieldDescriptor)
    if name.startswith("TYPE_")
}


@click.command()
@click.argument("symbol", required=False)
@click.option("--target", envvar="TOKENSTREAM_TARGET", default="127.0.0.1:50051", show_default=True)
def describe(symbol: str | None, target: str) -> None:
    """List the services, or describe SYMBOL (a service, method, message or enum).

    Works against any gRPC server with reflection, like `grpcurl describe`.
    """
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        try:
            if symbol is None:
                for service in database.get_services():
                    click.echo(service)
                return
            click.echo(_render(DescriptorPool(database), symbol))
        except grpc.RpcError as error:
            raise click.ClickException(
                f"{target}: {error.code().name}: {error.details()}"
            ) from error
        except KeyError as error:
            raise click.ClickException(f"{symbol!r} is not known to {target}") from error


def _render(pool: DescriptorPool, symbol: str) -> str:
    with contextlib.suppress(KeyError):
        return _service(pool.FindServiceByName(symbol))
    with contextlib.suppress(KeyError):
        return _message(pool.FindMessageTypeByName(symbol))
    with contextlib.suppress(KeyError):
        return _enum(pool.FindEnumTypeByName(symbol))
    service_name, _, method_name = symbol.rpartition(".")  # a method: Service.Method
    return _method(pool.FindServiceByName(service_name).methods_by_name[method_name])


def _method(method: descriptor.MethodDescriptor) -> str:
    stream = "stream " if method.server_streaming else ""
    return (
        f"rpc {method.name}({method.input_type.full_name}) "
        f"returns ({stream}{method.output_type.full_name});"
    )


def _service(service: descriptor.ServiceDescriptor) -> str:
    lines = [f"service {service.full_name} {{"]
    lines += [f"  {_method(method)}" for method in service.methods]
    return "\n".join([*lines, "}"])


def _message(message: descriptor.Descriptor) -> str:
    lines = [f"message {message.full_name} {{"]
    for field in message.fields:
        if field.message_type is not None:
            kind = field.message_type.full_name
        elif field.enum_type is not None:
            kind = field.enum_type.full_name
        else:
            kind = _SCALARS.get(field.type, "?")
        repeated = "repeated " if field.is_repeated else ""
        oneof = f"  // oneof {field.containing_oneof.name}" if field.containing_oneof else ""
        lines.append(f"  {repeated}{kind} {field.name} = {field.number};{oneof}")
    return "\n".join([*lines, "}"])


def _enum(enum: descriptor.EnumDescriptor) -> str:
    lines = [f"enum {enum.full_name} {{"]
    lines += [f"  {value.name} = {value.number};" for value in enum.values]
    return "\n".join([*lines, "}"])
