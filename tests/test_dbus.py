"""cpushare.dbus: the names, and the service object on a real private bus
over the real seller core (connected to a port that refuses, so it really is
'connecting')."""

from __future__ import annotations

import asyncio
import threading

import pytest
from dbus_fixtures import credentials, dead_port, system_bus, wait_for, write_order  # noqa: F401
from gi.repository import Gio, GLib

from cpushare import dbus
from cpushare.order import load_sell
from cpushare.seller import Seller


# --- names -------------------------------------------------------------------

@pytest.mark.parametrize("instance, label", [
    ("cpu0", "cpu0"), ("cpu-0", "cpu_2d0"), ("0", "_30"), ("", "_"), ("a.b", "a_2eb"),
    ("cpu_1", "cpu_5f1"), ("Ünï", "_c3_9cn_c3_af"),
])
def test_instance_names_escape_to_valid_bus_names_and_back(instance, label):
    name = dbus.bus_name(instance)
    assert name == f"org.cpushare.Seller1.{label}"
    assert Gio.dbus_is_name(name) and not Gio.dbus_is_unique_name(name)
    assert dbus.instance_of(name) == instance


def test_names_that_are_not_ours_are_not_instances():
    assert dbus.instance_of("org.cpushare.Seller2.cpu0") is None
    assert dbus.instance_of("org.cpushare.Seller1") is None
    assert dbus.instance_of("org.cpushare.Seller1.a.b") is None
    assert dbus.instance_of("org.cpushare.Seller1.bad_zz") is None


def test_introspection_declares_every_property_read_only():
    info = Gio.DBusNodeInfo.new_for_xml(dbus.INTROSPECTION).lookup_interface(dbus.INTERFACE)
    assert {p.name: p.signature for p in info.properties} == dbus.PROPERTY_TYPES
    assert all(p.flags == Gio.DBusPropertyInfoFlags.READABLE for p in info.properties)
    assert sorted(m.name for m in info.methods) == ["Pause", "Resume"]


# --- the service on a bus -------------------------------------------------------

class Loops:
    """The daemon's arrangement in miniature: GLib in one thread, the seller's
    asyncio loop in another, the test in the main thread."""

    def __init__(self):
        self.glib = GLib.MainLoop()
        self.glib_thread = threading.Thread(target=self.glib.run, daemon=True)
        self.aio = asyncio.new_event_loop()
        self.aio_thread = threading.Thread(target=self.aio.run_forever, daemon=True)
        self.glib_thread.start()
        self.aio_thread.start()
        self.futures = []

    def run(self, coro):
        self.futures.append(asyncio.run_coroutine_threadsafe(coro, self.aio))

    def close(self):
        for f in self.futures:
            f.result(timeout=10)
        self.aio.call_soon_threadsafe(self.aio.stop)
        self.aio_thread.join(5)
        self.aio.close()
        self.glib.quit()
        self.glib_thread.join(5)


def get_all(con, name):
    (props,) = con.call_sync(name, dbus.OBJECT_PATH, dbus.PROPERTIES_INTERFACE, "GetAll",
                             GLib.Variant("(s)", (dbus.INTERFACE,)), GLib.VariantType("(a{sv})"),
                             Gio.DBusCallFlags.NONE, 5000, None).unpack()
    return props


def call(con, name, method):
    return con.call_sync(name, dbus.OBJECT_PATH, dbus.INTERFACE, method, None, None,
                         Gio.DBusCallFlags.NONE, 5000, None)


@pytest.fixture
def published(system_bus, tmp_path, credentials, dead_port):  # noqa: F811
    order = load_sell(write_order(tmp_path / "cpu-0.cpu", credentials, dead_port))
    loops = Loops()
    calls = []
    holder = {}

    def on_change(status):
        holder["service"].update(status)

    seller = Seller(order, cache_dir=tmp_path / "cache", on_change=on_change)

    def pause():
        calls.append("pause")
        seller.pause()

    def resume():
        calls.append("resume")
        seller.resume()

    service = holder["service"] = dbus.SellerService(seller.status(), pause=pause, resume=resume)
    pub = dbus.Publication(dbus.connect("system"), order.name, service)
    client = dbus.connect("system")
    yield pub, client.con, seller, loops, calls
    seller.stop()
    loops.close()
    pub.close()
    client.con.close_sync(None)


def test_properties_follow_the_real_seller_with_signals(published):
    pub, con, seller, loops, _ = published
    assert pub.name == "org.cpushare.Seller1.cpu_2d0"
    assert dbus.list_instances(pub.bus) == {"cpu-0": pub.name}

    props = get_all(con, pub.name)
    assert list(props) == list(dbus.PROPERTY_TYPES)
    assert props["State"] == "starting"
    assert props["Order"] == "cpu-0"
    assert props["Model"] == "seccomp"
    assert props["Server"].startswith("127.0.0.1:")
    assert props["CurrentTask"] == "" and props["BuyerOrder"] == ""
    assert props["TasksDone"] == 0 and props["CoinsEarned"] == "0.000"
    assert props["ConnectedSince"] == 0

    changes = []
    con.signal_subscribe(pub.name, dbus.PROPERTIES_INTERFACE, "PropertiesChanged",
                         dbus.OBJECT_PATH, None, Gio.DBusSignalFlags.NONE,
                         lambda *a: changes.append(a[5].unpack()), None)
    loops.run(seller.run())
    # A refused connection: the seller records the error and keeps connecting.
    wait_for(lambda: get_all(con, pub.name)["LastError"], what="LastError on the bus")
    props = get_all(con, pub.name)
    assert props["State"] in ("connecting", "error")
    assert "127.0.0.1" in props["LastError"]
    wait_for(lambda: any(c[1].get("State") == "connecting" for c in changes),
             what="PropertiesChanged with State=connecting")
    iface, changed, invalidated = changes[0]
    assert iface == dbus.INTERFACE and invalidated == []
    assert set(changed) <= set(dbus.PROPERTY_TYPES)


def test_pause_and_resume_reach_the_core(published):
    pub, con, seller, loops, calls = published
    states = []
    con.signal_subscribe(pub.name, dbus.PROPERTIES_INTERFACE, "PropertiesChanged",
                         dbus.OBJECT_PATH, None, Gio.DBusSignalFlags.NONE,
                         lambda *a: states.append(a[5].unpack()[1].get("State")), None)
    loops.run(seller.run())
    wait_for(lambda: "connecting" in states, what="State=connecting")
    call(con, pub.name, "Pause")  # returns once the core's loop has run pause()
    assert calls == ["pause"]
    wait_for(lambda: "paused" in states, what="PropertiesChanged State=paused")
    call(con, pub.name, "Resume")
    assert calls == ["pause", "resume"]
    wait_for(lambda: states[states.index("paused") + 1:], what="a State after Resume")


def test_a_failing_core_call_is_a_named_dbus_error(system_bus):  # noqa: F811
    class Snapshot:  # only the fields status_properties() reads
        state, order, model, server = "idle", "cpu0", "seccomp", "m:7300"
        current_task = buyer_order = None
        tasks_done, cpu_seconds_sold, coins_earned_milli = 3, 1.5, 42
        connected_since, last_error = 1700000000.25, ""

    def broken():
        raise OSError(5, "stuck")

    loops = Loops()
    service = dbus.SellerService(Snapshot(), pause=broken, resume=broken)
    pub = dbus.Publication(dbus.connect("system"), "cpu0", service)
    con = dbus.connect("system").con
    try:
        props = get_all(con, pub.name)
        assert props["CoinsEarned"] == "0.042"
        assert props["ConnectedSince"] == 1700000000250000
        with pytest.raises(GLib.Error) as e:
            call(con, pub.name, "Pause")
        assert dbus.remote_error(e.value) == f"{dbus.ERROR_PREFIX}.Failed"
        assert dbus.error_message(e.value).startswith("Pause() failed in process ")
        assert "stuck" in dbus.error_message(e.value)
        # A second owner of the same instance is refused, naming the name.
        with pytest.raises(dbus.NameTaken, match="org.cpushare.Seller1.cpu0 is already owned"):
            dbus.Publication(dbus.connect("system"), "cpu0", service)
    finally:
        loops.close()
        pub.close()
