"""``fedmq pki``: the plant CA, device and service identities, the broker's ACL and config.

Exit codes (:mod:`fedmq.exit_codes`): 0 done; 78 bad input, a missing CA, or a file
that exists (pass ``--force``); 74 the disk refused a write.  Every command takes
``--dir`` (default ``./pki``, or ``$FEDMQ_PKI_DIR``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedmq import exit_codes
from fedmq.broker.mosquitto import (
    DEFAULT_MAX_PACKET_SIZE,
    PACKET_HEADROOM,
    ProductionMosquittoConfig,
    TlsFiles,
    queue_limits,
)
from fedmq.errors import ConfigError
from fedmq.pki import Issued, PkiDirectory, aggregator_client_id
from fedmq.pki.bundle import DEFAULT_BROKER_URL, DEFAULT_INSTALL_DIR, DEFAULT_STATE_DIR
from fedmq.pki.ca import CA_DAYS
from fedmq.pki.directory import CLIENT_DAYS, DEFAULT_DIR, DEFAULT_MONITOR
from fedmq.pki.snippets import broker_lines, security_lines
from fedmq.wire.topics import DEFAULT_ROOT

pki_app = typer.Typer(
    name="pki",
    help="The plant CA, device and service certificates, the broker's ACL and config.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DirOption = Annotated[
    Path,
    typer.Option("--dir", envvar="FEDMQ_PKI_DIR", help="the PKI directory"),
]
ForceOption = Annotated[
    bool, typer.Option("--force", help="overwrite existing files (and revoke what they replace)")
]
DaysOption = Annotated[int, typer.Option(help="validity in days (never past the CA's)")]
BrokerUrlOption = Annotated[
    str, typer.Option(help="the broker as clients reach it: mqtts://host:port")
]

MiB = 1024 * 1024


def _console() -> Console:
    # Created per command so CliRunner's captured stdout is used; soft_wrap keeps long
    # paths and TOML lines whole for copy-paste.
    return Console(soft_wrap=True, highlight=False)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn fedmq errors into a message and an exit code."""
    try:
        yield
    except ConfigError as exc:
        typer.echo(f"fedmq pki: {exc}", err=True)
        raise typer.Exit(exit_codes.CONFIG_ERROR) from None
    except OSError as exc:
        typer.echo(f"fedmq pki: cannot write: {exc}", err=True)
        raise typer.Exit(exit_codes.STATE_FAILURE) from None


def _show_files(console: Console, heading: str, paths: tuple[Path, ...] | list[Path]) -> None:
    console.print(heading)
    for path in dict.fromkeys(paths):
        console.print(f"  {escape(str(path))}")


def _show_issued(console: Console, issued: Issued) -> None:
    entry = issued.entry
    console.print(
        f"issued {entry.kind.value} [bold]{escape(entry.cn)}[/bold]: serial {entry.serial:x}, "
        f"valid until {entry.not_after:%Y-%m-%d}"
    )
    console.print(f"  certificate {escape(str(issued.cert.cert))}")
    console.print(f"  key         {escape(str(issued.cert.key))} (0600)")
    for old in issued.superseded:
        console.print(
            f"  revoked the certificate it replaces (serial {old.serial:x}); "
            "reload the broker to load the new CRL"
        )


def _show_toml(console: Console, intro: str, text: str) -> None:
    console.print(intro)
    console.print(text.rstrip("\n"), markup=False)


@pki_app.command("init")
def init_command(
    plant: Annotated[str, typer.Option(help="plant name (in the CA's subject)")],
    directory: DirOption = DEFAULT_DIR,
    days: DaysOption = CA_DAYS,
    force: ForceOption = False,
) -> None:
    """Create the plant CA, the aggregator's signing key pair and an empty CRL."""
    console = _console()
    with _errors():
        pki, files = PkiDirectory.create(directory, plant, force=force, days=days)
    _show_files(console, f"created the plant CA of [bold]{escape(plant)}[/bold]:", files)
    if force:
        console.print(
            "[yellow]a replaced CA makes every certificate it issued untrusted: issue and "
            "provision every identity again[/yellow]"
        )
    _show_toml(console, "\nfederation.toml of each aggregator:", security_lines(pki.layout))
    console.print(
        "\nnext: fedmq pki broker --host HOST; fedmq pki aggregator --federation FED; "
        "fedmq pki device ID --federation FED"
    )


@pki_app.command("device")
def device_command(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="device id = MQTT client id")],
    federation: Annotated[str, typer.Option(help="the federation it trains for")],
    directory: DirOption = DEFAULT_DIR,
    broker_url: BrokerUrlOption = DEFAULT_BROKER_URL,
    root: Annotated[str, typer.Option(help="topic root")] = DEFAULT_ROOT,
    install_dir: Annotated[
        str, typer.Option(help="where the bundle is installed on the device ('.': relative)")
    ] = DEFAULT_INSTALL_DIR,
    state_dir: Annotated[
        str, typer.Option(help="the agent's state directory on the device (data: <it>/data)")
    ] = DEFAULT_STATE_DIR,
    archive: Annotated[
        bool, typer.Option("--archive", help="also write bundles/ID.tar.gz")
    ] = False,
    days: DaysOption = CLIENT_DAYS,
    force: ForceOption = False,
) -> None:
    """Issue a device: certificate, update signing key, registry entry, provisioning bundle."""
    console = _console()
    with _errors():
        pki = PkiDirectory.open(directory)
        issued = pki.device(
            device_id,
            federation=federation,
            broker_url=broker_url,
            topic_root=root,
            install_dir=install_dir,
            state_dir=state_dir,
            with_archive=archive,
            force=force,
            days=days,
        )
    _show_issued(console, issued)
    console.print(f"  registered  {escape(str(issued.extra['registry']))}")
    console.print(
        f"  bundle      {escape(str(issued.extra['bundle']))}/ (agent.toml for {install_dir})"
    )
    if "archive" in issued.extra:
        console.print(f"  archive     {escape(str(issued.extra['archive']))} (0600)")
    console.print("the bundle holds the device's private keys: delete it once provisioned")


@pki_app.command("aggregator")
def aggregator_command(
    federation: Annotated[str, typer.Option(help="the federation it serves")],
    client_id: Annotated[
        str | None,
        typer.Option(help="its MQTT client id (default fedmq-aggregator-FED, as fedmq serve)"),
    ] = None,
    directory: DirOption = DEFAULT_DIR,
    broker_url: BrokerUrlOption = DEFAULT_BROKER_URL,
    days: DaysOption = CLIENT_DAYS,
    force: ForceOption = False,
) -> None:
    """Issue the aggregator's client certificate; print its federation.toml lines."""
    console = _console()
    with _errors():
        pki = PkiDirectory.open(directory)
        issued = pki.aggregator(
            federation, client_id=client_id, broker_url=broker_url, force=force, days=days
        )
    _show_issued(console, issued)
    _show_toml(
        console,
        f"\nfederation.toml of {escape(federation)} (also in "
        f"{escape(str(issued.extra['snippet']))}):",
        broker_lines(pki.layout, issued.entry.cn, broker_url) + "\n" + security_lines(pki.layout),
    )


@pki_app.command("monitor")
def monitor_command(
    name: Annotated[str, typer.Option(help="its CN and MQTT username")] = DEFAULT_MONITOR,
    directory: DirOption = DEFAULT_DIR,
    days: DaysOption = CLIENT_DAYS,
    force: ForceOption = False,
) -> None:
    """Issue a read-only monitor identity (round, statuses; never updates or blobs)."""
    console = _console()
    with _errors():
        issued = PkiDirectory.open(directory).monitor(name, force=force, days=days)
    _show_issued(console, issued)
    console.print("the ACL grants it read access: fedmq pki acl --federation FED")


@pki_app.command("broker")
def broker_command(
    host: Annotated[
        list[str], typer.Option(help="DNS name or IP clients connect to (repeat for more)")
    ],
    directory: DirOption = DEFAULT_DIR,
    days: DaysOption = CLIENT_DAYS,
    force: ForceOption = False,
) -> None:
    """Issue the broker's server certificate for its host names and addresses."""
    console = _console()
    with _errors():
        issued = PkiDirectory.open(directory).broker(host, force=force, days=days)
    _show_issued(console, issued)
    console.print(f"  names       {escape(', '.join(host))}")


@pki_app.command("revoke")
def revoke_command(
    name: Annotated[str, typer.Argument(metavar="ID", help="device id or other issued name")],
    directory: DirOption = DEFAULT_DIR,
) -> None:
    """Revoke a certificate: regenerate the CRL and drop the device from the registry."""
    console = _console()
    with _errors():
        revoked = PkiDirectory.open(directory).revoke(name)
    serials = ", ".join(f"{entry.serial:x}" for entry in revoked.entries)
    console.print(f"revoked [bold]{escape(name)}[/bold] (serial {serials})")
    console.print(f"  CRL         {escape(str(revoked.crl))}")
    if revoked.unregistered is not None:
        console.print(
            f"  unregistered {escape(str(revoked.unregistered))}: the aggregator accepts "
            "no more updates signed by its key"
        )
    console.print(
        "copy the CRL to the broker and reload it (systemctl reload mosquitto: SIGHUP). "
        "Until then the broker accepts the certificate, and a client already connected "
        "stays connected until it reconnects."
    )


@pki_app.command("acl")
def acl_command(
    federation: Annotated[list[str], typer.Option(help="a federation it serves (repeatable)")],
    directory: DirOption = DEFAULT_DIR,
    root: Annotated[str, typer.Option(help="topic root")] = DEFAULT_ROOT,
    aggregator: Annotated[
        str | None,
        typer.Option(help="the aggregator's client id (default fedmq-aggregator-FED)"),
    ] = None,
    monitor: Annotated[
        list[str] | None,
        typer.Option(help="monitor name (repeatable; default every monitor issued)"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="file to write (default DIR/mosquitto/acl)")
    ] = None,
    force: ForceOption = False,
) -> None:
    """Write the Mosquitto acl_file of the federations, from the topic scheme."""
    console = _console()
    with _errors():
        pki = PkiDirectory.open(directory)
        acl = pki.acl(federation, aggregator=aggregator, monitors=monitor, root=root)
        path = pki.write_text(out or pki.layout.acl, acl.text(), force=force)
    console.print(f"wrote {escape(str(path))}:")
    for federation_id in federation:
        console.print(
            f"  agents of {escape(federation_id)}: patterns by certificate CN; aggregator "
            f"{escape(aggregator or aggregator_client_id(federation_id))}"
        )
    monitors = [user for user in acl.users if acl.comments.get(user, "").endswith("monitor")]
    console.print(f"  monitors: {escape(', '.join(monitors) or 'none')}")
    console.print("reload the broker to apply it (systemctl reload mosquitto)")


@pki_app.command("broker-config")
def broker_config_command(
    directory: DirOption = DEFAULT_DIR,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="file to write (default DIR/mosquitto/mosquitto.conf)"),
    ] = None,
    install_dir: Annotated[
        Path | None,
        typer.Option(
            help="where the broker finds ca.pem, broker.pem/.key, crl.pem, acl (default: in DIR)"
        ),
    ] = None,
    port: Annotated[int, typer.Option(help="TLS listener port")] = 8883,
    bind: Annotated[str, typer.Option(help="listen address ('' = every interface)")] = "",
    user: Annotated[str, typer.Option(help="the user Mosquitto runs as")] = "mosquitto",
    persistence_dir: Annotated[Path, typer.Option(help="persistence_location")] = Path(
        "/var/lib/mosquitto"
    ),
    log_file: Annotated[Path, typer.Option(help="log file")] = Path(
        "/var/log/mosquitto/mosquitto.log"
    ),
    agents: Annotated[int, typer.Option(help="queue rule: agents of the largest round")] = 100,
    update_mb: Annotated[float, typer.Option(help="queue rule: update size, MiB")] = 4.0,
    chunk_kib: Annotated[int, typer.Option(help="queue rule: chunk_size, KiB")] = 256,
    outage_rounds: Annotated[
        int, typer.Option(help="queue rule: rounds an aggregator outage may span")
    ] = 1,
    force: ForceOption = False,
) -> None:
    """Render the production Mosquitto config (mTLS, ACL, CRL, queues sized by the rule)."""
    console = _console()
    with _errors():
        pki = PkiDirectory.open(directory)
        layout = pki.layout
        chunk_size = chunk_kib * 1024
        messages, queued_bytes = queue_limits(
            agents, round(update_mb * MiB), chunk_size, outage_rounds
        )
        sources = {
            "ca.pem": layout.ca.cert,
            "broker.pem": layout.broker.cert,
            "broker.key": layout.broker.key,
            "crl.pem": layout.crl,
            "acl": layout.acl,
        }
        place: Callable[[str], Path] = (
            (lambda name: sources[name].absolute())
            if install_dir is None
            else (lambda name: install_dir / name)
        )
        config = ProductionMosquittoConfig(
            tls=TlsFiles(
                place("ca.pem"), place("broker.pem"), place("broker.key"), place("crl.pem")
            ),
            acl_file=place("acl"),
            port=port,
            bind_address=bind,
            user=user,
            max_packet_size=max(DEFAULT_MAX_PACKET_SIZE, chunk_size + PACKET_HEADROOM),
            max_queued_messages=messages,
            max_queued_bytes=queued_bytes,
            persistence_location=persistence_dir,
            log_file=log_file,
        )
        text = config.render(persistence_dir)
        path = pki.write_text(out or layout.broker_config, text, force=force)
    console.print(
        f"wrote {escape(str(path))} (port {port}, {messages} messages / "
        f"{queued_bytes} bytes queued per client)"
    )
    missing = [name for name, source in sources.items() if not source.exists()]
    if missing:
        console.print(
            f"[yellow]not made yet: {escape(', '.join(missing))} (fedmq pki broker / "
            "fedmq pki acl)[/yellow]"
        )
    if install_dir is not None:
        public = " ".join(str(sources[name]) for name in ("ca.pem", "broker.pem", "crl.pem", "acl"))
        console.print("install the files it names:")
        console.print(f"  install -d -m 0755 {install_dir}", markup=False)
        console.print(f"  install -m 0644 {public} {install_dir}/", markup=False)
        console.print(
            f"  install -m 0600 -o {user} {sources['broker.key']} {install_dir}/", markup=False
        )
    console.print(
        f"install it as /etc/mosquitto/mosquitto.conf (a complete config, not a conf.d "
        f"drop-in); the key, CRL and ACL must be readable by user {escape(user)}"
    )


@pki_app.command("signing-key")
def signing_key_command(
    name: Annotated[str, typer.Option(help="file name: aggregator/NAME.sign and NAME.pub")],
    directory: DirOption = DEFAULT_DIR,
    force: ForceOption = False,
) -> None:
    """Make another aggregator signing key pair, to rotate keys (docs/deploy.md)."""
    console = _console()
    with _errors():
        secret, public = PkiDirectory.open(directory).signing_key(name, force=force)
    _show_files(
        console, f"new aggregator signing key [bold]{escape(name)}[/bold]:", [secret, public]
    )
    console.print(
        f"next: add {public.name} to every agent's security.aggregator_keys, then point the "
        f"aggregator's security.signing_key at {secret.name}"
    )


@pki_app.command("list")
def list_command(directory: DirOption = DEFAULT_DIR) -> None:
    """Show every certificate issued, newest last."""
    console = _console()
    with _errors():
        index = PkiDirectory.open(directory).index()
    table = Table(title=f"plant {escape(index.plant)}")
    for column in ("serial", "name", "kind", "valid until", "revoked"):
        table.add_column(column, overflow="fold")
    for entry in index.entries:
        table.add_row(
            f"{entry.serial:x}",
            escape(entry.cn),
            entry.kind.value,
            f"{entry.not_after:%Y-%m-%d}",
            f"{entry.revoked:%Y-%m-%d}" if entry.revoked else "",
        )
    console.print(table)
