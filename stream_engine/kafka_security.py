"""How the worker and the API authenticate to Kafka: TLS, SASL, or both.

A managed broker (Confluent Cloud, MSK, Aiven, Redpanda Cloud) takes no plaintext,
unauthenticated client; a self-hosted one often doesn't either. One `KafkaSecurity`, read
from `KAIROS_KAFKA_*` variables, configures every client Kairos opens — aiokafka's
(the faust and aiokafka engines, the catalog follower, the attribution consumer, the topic
admin), librdkafka's (the librdkafka engine, the API's exposures and beacons, the topic-id
reader) and faust's — so no client is left on plaintext when the others are not.

The default is PLAINTEXT with nothing else set, and adds no option to any client. A
setting that could not work (a SASL protocol without a user, a certificate without its
key, a file that is not there, a username with a protocol that sends none) is refused at
start, naming the variable, instead of failing on every connection attempt later.
"""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stream_engine.exceptions import ConfigError

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
ENV_PREFIX = "KAIROS_KAFKA_"


@dataclass(frozen=True, slots=True)
class KafkaSecurity:
    """Environment: KAIROS_KAFKA_<FIELD> (e.g. KAIROS_KAFKA_SECURITY_PROTOCOL)."""

    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    # PEM files. No CA file: the system's trust store (what a managed broker's public
    # certificate needs). A client certificate and its key: for brokers that ask for one.
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    ssl_check_hostname: bool = True

    def __post_init__(self) -> None:
        for name in ("security_protocol", "sasl_mechanism"):  # sasl_ssl is SASL_SSL
            object.__setattr__(self, name, getattr(self, name).strip().upper())
        protocol = self.security_protocol
        if protocol not in PROTOCOLS:
            raise ConfigError(
                f"{_var('security_protocol')} must be one of "
                f"{', '.join(PROTOCOLS)}, got {protocol!r}"
            )
        if self.sasl:
            if self.sasl_mechanism not in MECHANISMS:
                raise ConfigError(
                    f"{_var('sasl_mechanism')} must be one of "
                    f"{', '.join(MECHANISMS)}, got {self.sasl_mechanism!r}"
                )
            if not self.sasl_username or not self.sasl_password:
                raise ConfigError(
                    f"{_var('security_protocol')}={protocol} needs "
                    f"{_var('sasl_username')} and {_var('sasl_password')}"
                )
        elif self.sasl_username or self.sasl_password:
            raise ConfigError(
                f"{_var('sasl_username')}/{_var('sasl_password')} are set, but "
                f"{_var('security_protocol')}={protocol} sends no credentials "
                "(SASL_SSL or SASL_PLAINTEXT would)"
            )
        files = ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
        if not self.tls and any(getattr(self, name) for name in files):
            raise ConfigError(
                f"{_var('security_protocol')}={protocol} uses no TLS, but "
                f"{', '.join(_var(n) for n in files if getattr(self, n))} "
                "is set (SSL or SASL_SSL would use it)"
            )
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ConfigError(
                f"{_var('ssl_certfile')} and {_var('ssl_keyfile')} go together "
                "(a client certificate and its private key)"
            )
        for name in files:
            path = getattr(self, name)
            if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
                raise ConfigError(f"{_var(name)}={path!r}: no such readable file")
        if self.tls:
            try:
                ssl_context(self)
            except (ssl.SSLError, OSError, ValueError) as exc:
                named = ", ".join(_var(n) for n in files if getattr(self, n))
                raise ConfigError(
                    f"{named or _var('ssl_cafile')}: not usable for TLS ({exc})"
                ) from None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KafkaSecurity:
        from stream_engine.settings import from_environment  # settings imports this module

        return from_environment(cls, env, prefix=ENV_PREFIX)

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def aiokafka(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka's producer, consumer and admin client."""
        if self.security_protocol == "PLAINTEXT":
            return {}
        kwargs: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.tls:
            kwargs["ssl_context"] = ssl_context(self)
        if self.sasl:
            kwargs |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.sasl_username,
                "sasl_plain_password": self.sasl_password,
            }
        return kwargs

    def librdkafka(self) -> dict[str, Any]:
        """Properties for librdkafka's (confluent-kafka's) clients."""
        if self.security_protocol == "PLAINTEXT":
            return {}
        config: dict[str, Any] = {"security.protocol": self.security_protocol.lower()}
        if self.tls:
            config["ssl.endpoint.identification.algorithm"] = (
                "https" if self.ssl_check_hostname else "none"
            )
            for name, key in (
                ("ssl_cafile", "ssl.ca.location"),
                ("ssl_certfile", "ssl.certificate.location"),
                ("ssl_keyfile", "ssl.key.location"),
            ):
                if path := getattr(self, name):
                    config[key] = path
        if self.sasl:
            config |= {
                "sasl.mechanisms": self.sasl_mechanism,
                "sasl.username": self.sasl_username,
                "sasl.password": self.sasl_password,
            }
        return config

    def faust(self) -> Any:
        """faust's `broker_credentials`: None for PLAINTEXT."""
        import faust

        if self.security_protocol == "PLAINTEXT":
            return None
        context = ssl_context(self) if self.tls else None
        if not self.sasl:
            return faust.SSLCredentials(context)
        return faust.SASLCredentials(
            username=self.sasl_username,
            password=self.sasl_password,
            ssl_context=context,
            mechanism=self.sasl_mechanism,
        )


PLAINTEXT = KafkaSecurity()  # the default: no option added to any client


def _var(name: str) -> str:
    return f"{ENV_PREFIX}{name.upper()}"


@functools.cache
def ssl_context(security: KafkaSecurity) -> ssl.SSLContext:
    """One context per setting, shared by every aiokafka client of the process."""
    context = ssl.create_default_context(cafile=security.ssl_cafile or None)
    context.check_hostname = security.ssl_check_hostname
    if security.ssl_certfile:
        context.load_cert_chain(security.ssl_certfile, security.ssl_keyfile)
    return context
