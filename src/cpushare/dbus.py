"""Every D-Bus name CPUShare uses, and the service object over the seller's status.

One well-known name per daemon instance on the system bus::

    org.cpushare.Seller1.<label>      object /org/cpushare/Seller1
                                      interface org.cpushare.Seller1

``<label>`` is the instance name (the order file's stem, ``cpu0`` for
``/etc/cpushare/cpu0.cpu``) escaped the way systemd escapes bus labels: ASCII
letters and digits stay, every other byte becomes ``_`` and two lower-case hex
digits, and so does a digit in first place (a bus-name element must not start
with one).  ``cpu0`` stays ``cpu0``; ``cpu-0`` becomes ``cpu_2d0``; ``0``
becomes ``_30``; the empty name becomes ``_``.

Properties (all read-only; ``PropertiesChanged`` carries new values):

=================  ====  ===================================================
State              s     starting connecting idle running paused stopping
                         stopped error
Order              s     the instance name (the order file's stem)
Model              s     seccomp or kvm
Server             s     the market, HOST:PORT
CurrentTask        s     the running task's id, "" when none
BuyerOrder         s     the buy order the running task belongs to, "" if none
TasksDone          t     tasks finished since the daemon started
CpuSecondsSold     d     CPU seconds sold since the daemon started
CoinsEarned        s     CPUCoins earned since the daemon started, as an exact
                         decimal with three places ("0.042"), never a float
ConnectedSince     t     when the current connection to the market was made,
                         microseconds since the epoch (CLOCK_REALTIME), 0 when
                         not connected
LastError          s     the last error the seller met, "" when none
=================  ====  ===================================================

Methods ``Pause()`` and ``Resume()``: Pause stops the running job (SIGSTOP)
without losing its work and takes no new task; Resume continues.  Both are
idempotent.  The system bus policy (``dbus/org.cpushare.Seller1.conf``) lets
only root and the group ``cpushare-admin`` call them.

This module imports pydbus and GLib but never the seller core: ``cpusharectl``
uses it for the names alone.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Mapping

from gi.repository import Gio, GLib
from pydbus.generic import signal

SERVICE_USER = "cpushare"
ADMIN_GROUP = "cpushare-admin"

BUS_NAME_PREFIX = "org.cpushare.Seller1"
OBJECT_PATH = "/org/cpushare/Seller1"
INTERFACE = "org.cpushare.Seller1"
ERROR_PREFIX = "org.cpushare.Seller1.Error"
PROPERTIES_INTERFACE = "org.freedesktop.DBus.Properties"

ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
SERVICE_UNKNOWN = "org.freedesktop.DBus.Error.ServiceUnknown"
NAME_HAS_NO_OWNER = "org.freedesktop.DBus.Error.NameHasNoOwner"

BUSES = ("system", "session")

# Order matters: it is the order of `cpusharectl status` and of GetAll.
PROPERTY_TYPES: dict[str, str] = {
    "State": "s",
    "Order": "s",
    "Model": "s",
    "Server": "s",
    "CurrentTask": "s",
    "BuyerOrder": "s",
    "TasksDone": "t",
    "CpuSecondsSold": "d",
    "CoinsEarned": "s",
    "ConnectedSince": "t",
    "LastError": "s",
}

INTROSPECTION = f"""<node>
  <interface name="{INTERFACE}">
{''.join(f'    <property name="{n}" type="{t}" access="read"/>{chr(10)}' for n, t in PROPERTY_TYPES.items())}\
    <method name="Pause"/>
    <method name="Resume"/>
  </interface>
</node>"""


# --- names ------------------------------------------------------------------

def escape_label(name: str) -> str:
    """Escape an instance name into one valid bus-name element (see above)."""
    if not name:
        return "_"
    out = []
    for i, byte in enumerate(name.encode("utf-8")):
        ch = chr(byte)
        if (ch.isascii() and ch.isalpha()) or (ch.isdigit() and ch.isascii() and i > 0):
            out.append(ch)
        else:
            out.append(f"_{byte:02x}")
    return "".join(out)


def unescape_label(label: str) -> str:
    """The inverse of escape_label(); ValueError names the bad label."""
    if label == "_":
        return ""
    out = bytearray()
    i = 0
    while i < len(label):
        ch = label[i]
        if ch == "_":
            try:
                out.append(int(label[i + 1:i + 3], 16))
            except ValueError:
                raise ValueError(f"bad escape in bus name label {label!r} at offset {i}") from None
            if len(label[i + 1:i + 3]) != 2:
                raise ValueError(f"bad escape in bus name label {label!r} at offset {i}")
            i += 3
        else:
            out += ch.encode("ascii")
            i += 1
    return out.decode("utf-8", errors="replace")


def bus_name(instance: str) -> str:
    """org.cpushare.Seller1.<escaped instance>"""
    return f"{BUS_NAME_PREFIX}.{escape_label(instance)}"


def instance_of(name: str) -> str | None:
    """The instance a well-known bus name belongs to, or None if it is not ours."""
    head = BUS_NAME_PREFIX + "."
    if not name.startswith(head) or "." in name[len(head):]:
        return None
    try:
        return unescape_label(name[len(head):])
    except ValueError:
        return None


# --- connections ------------------------------------------------------------

def bus_address(bus: str) -> str:
    """The address of the system or session bus, as GIO resolves it
    (DBUS_SYSTEM_BUS_ADDRESS / DBUS_SESSION_BUS_ADDRESS first)."""
    if bus not in BUSES:
        raise ValueError(f"unknown bus {bus!r}: expected one of {', '.join(BUSES)}")
    kind = Gio.BusType.SYSTEM if bus == "system" else Gio.BusType.SESSION
    return Gio.dbus_address_get_for_bus_sync(kind, None)


def connect(bus: str):
    """A new private connection (a pydbus Bus) to the system or session bus.

    Not GIO's shared singleton: each caller owns its connection and can close
    it, and tests can run several in one process.  Raises GLib.Error when the
    bus is unreachable.
    """
    import pydbus.bus

    address = bus_address(bus)
    flags = (Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
             | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION)
    con = Gio.DBusConnection.new_for_address_sync(address, flags, None, None)
    return pydbus.bus.Bus(con)


def remote_error(err: GLib.Error) -> str | None:
    """The D-Bus error name inside a GLib.Error (e.g. ACCESS_DENIED), or None."""
    return Gio.DBusError.get_remote_error(err) if Gio.DBusError.is_remote_error(err) else None


def error_message(err: GLib.Error) -> str:
    """The text of a GLib.Error without GIO's 'GDBus.Error:NAME: ' prefix."""
    text = err.message
    name = remote_error(err)
    prefix = f"GDBus.Error:{name}: "
    if name and text.startswith(prefix):
        return text[len(prefix):]
    return text


# --- the service object -----------------------------------------------------

def _dbus_error(short: str):
    """An exception class whose name pydbus sends as the D-Bus error name
    (pydbus replies with type(e).__name__ when it contains a dot)."""
    cls = type(short, (Exception,), {"__doc__": f"D-Bus error {ERROR_PREFIX}.{short}"})
    cls.__name__ = f"{ERROR_PREFIX}.{short}"
    cls.__qualname__ = cls.__name__
    return cls


Failed = _dbus_error("Failed")


def format_milli(milli: int) -> str:
    """42 -> '0.042' (exact; money never goes through a float)."""
    sign = "-" if milli < 0 else ""
    whole, frac = divmod(abs(int(milli)), 1000)
    return f"{sign}{whole}.{frac:03d}"


def status_properties(status: Any) -> dict[str, Any]:
    """The D-Bus property values of a seller Status snapshot (duck-typed: this
    module does not import the core)."""
    since = status.connected_since
    return {
        "State": status.state,
        "Order": status.order,
        "Model": status.model,
        "Server": status.server,
        "CurrentTask": status.current_task or "",
        "BuyerOrder": status.buyer_order or "",
        "TasksDone": int(status.tasks_done),
        "CpuSecondsSold": float(status.cpu_seconds_sold),
        "CoinsEarned": format_milli(status.coins_earned_milli),
        "ConnectedSince": int(since * 1_000_000) if since else 0,
        "LastError": status.last_error or "",
    }


class SellerService:
    """The object published at OBJECT_PATH: a read-only view of the latest
    Status snapshot plus Pause/Resume.

    ``pause`` and ``resume`` are plain callables; the daemon passes ones that
    run the core's methods on its asyncio loop and wait for them.  update()
    may be called from any thread: it swaps the snapshot and emits
    PropertiesChanged with the values that changed (GDBus sends signals from
    any thread).
    """

    dbus = INTROSPECTION
    PropertiesChanged = signal()

    def __init__(self, status: Any, *, pause: Callable[[], None],
                 resume: Callable[[], None]) -> None:
        self._lock = threading.Lock()
        self._props = status_properties(status)
        self._pause = pause
        self._resume = resume

    def update(self, status: Any) -> dict[str, Any]:
        """Take a new snapshot; emit and return what changed."""
        new = status_properties(status)
        with self._lock:
            changed = {k: v for k, v in new.items() if self._props.get(k) != v}
            self._props = new
            if changed:
                self.PropertiesChanged(INTERFACE, changed, [])
        return changed

    @property
    def properties(self) -> Mapping[str, Any]:
        return dict(self._props)

    def Pause(self) -> None:  # noqa: N802 (D-Bus names)
        self._call(self._pause, "Pause")

    def Resume(self) -> None:  # noqa: N802
        self._call(self._resume, "Resume")

    @staticmethod
    def _call(fn: Callable[[], None], what: str) -> None:
        try:
            fn()
        except Exception as e:  # the caller gets a D-Bus error naming the call
            raise Failed(f"{what}() failed in process {os.getpid()}: {e}") from e


def _property(name: str) -> property:
    return property(lambda self: self._props[name], doc=f"D-Bus property {name}")


for _name in PROPERTY_TYPES:
    setattr(SellerService, _name, _property(_name))
del _name


class Publication:
    """SellerService published on a bus under its instance's well-known name.

    Registration happens in the calling thread, so method calls are
    dispatched by whichever thread runs the default GLib main context
    (g_dbus_connection_register_object uses the thread-default context of
    the caller, and the daemon registers from its main thread before the
    GLib thread starts iterating the global default context).
    """

    def __init__(self, bus, instance: str, service: SellerService) -> None:
        self.bus = bus
        self.name = bus_name(instance)
        self._registration = bus.register_object(OBJECT_PATH, service, None)
        try:
            request_name(bus, self.name)
        except Exception:
            self._registration.unregister()
            raise

    def close(self) -> None:
        try:
            _bus_call(self.bus, "ReleaseName", "(s)", (self.name,), "(u)")
        except GLib.Error:
            pass  # the connection is gone, and the name with it
        finally:
            self._registration.unregister()


class NameTaken(Exception):
    """The well-known name is owned by another connection."""


def _bus_call(bus, method: str, sig: str, args: tuple, reply: str):
    return bus.con.call_sync(
        "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", method,
        GLib.Variant(sig, args), GLib.VariantType(reply), Gio.DBusCallFlags.NONE, 10_000,
        None).unpack()


def request_name(bus, name: str) -> None:
    """Own `name` on `bus` (no queueing, no replacement).  Raises NameTaken,
    or GLib.Error (AccessDenied when the bus policy forbids owning it)."""
    (res,) = _bus_call(bus, "RequestName", "(su)", (name, 4), "(u)")  # DO_NOT_QUEUE
    if res not in (1, 4):  # PRIMARY_OWNER, ALREADY_OWNER
        (owner,) = _bus_call(bus, "GetNameOwner", "(s)", (name,), "(s)")
        raise NameTaken(f"bus name {name} is already owned by connection {owner}")


def list_instances(bus) -> dict[str, str]:
    """{instance: bus name} for every seller instance on the bus."""
    (names,) = _bus_call(bus, "ListNames", "()", (), "(as)")
    found = {}
    for name in names:
        inst = instance_of(name)
        if inst is not None:
            found[inst] = name
    return dict(sorted(found.items()))
