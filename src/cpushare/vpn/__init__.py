"""The encrypted Ethernet link between a seller's guest and the buyer's cluster.

datagram: the datagram layer (docs/vpn.md), the public face of the C
extension cpushare._link: keys per lease and direction, sealing and opening
datagrams, and the Pump that carries frames between a local end (qemu's
``-netdev dgram`` socket, or a TAP device) and the peer over UDP.

The link never imports the market: the market only hands both ends a
lease's LinkKeys and the buyer's address.
"""
