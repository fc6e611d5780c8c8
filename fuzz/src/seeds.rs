//! Seed inputs: the datagrams real boot firmware sent ringtftpd in the qemu
//! boot test (as replayed in tests/firmware.rs: Debian's iPXE ROM,
//! pxelinux 6.04, OVMF), typical requests of other clients, and, for the
//! stateful targets, those datagrams encoded as harness operations.
//! `cargo run --example seeds` writes them to corpus/<target>/.

/// iPXE: `chain` of boot.ipxe, the per-MAC miss, default.ipxe, the kernel.
pub const IPXE_RRQS: &[&[u8]] = &[
    b"\x00\x01boot.ipxe\x00octet\x00blksize\x001432\x00tsize\x000\x00",
    b"\x00\x0152-54-00-5e-ed-01.ipxe\x00octet\x00blksize\x001432\x00tsize\x000\x00",
    b"\x00\x01default.ipxe\x00octet\x00blksize\x001432\x00tsize\x000\x00",
    b"\x00\x01vmlinuz\x00octet\x00blksize\x001432\x00tsize\x000\x00",
];

/// pxelinux 6.04: tsize before blksize; the config search path.
pub const PXELINUX_RRQS: &[&[u8]] = &[
    b"\x00\x01ldlinux.c32\x00octet\x00tsize\x000\x00blksize\x001408\x00",
    b"\x00\x01pxelinux.cfg/01-52-54-00-5e-ed-01\x00octet\x00tsize\x000\x00blksize\x001408\x00",
    b"\x00\x01pxelinux.cfg/C6120065\x00octet\x00tsize\x000\x00blksize\x001408\x00",
    b"\x00\x01pxelinux.cfg/C\x00octet\x00tsize\x000\x00blksize\x001408\x00",
    b"\x00\x01pxelinux.cfg/default\x00octet\x00tsize\x000\x00blksize\x001408\x00",
];

/// OVMF: the tsize probe, its ERROR 8 abort, the windowed fetch.
pub const OVMF_PROBE: &[u8] =
    b"\x00\x01snponly.efi\x00octet\x00tsize\x000\x00blksize\x001468\x00windowsize\x004\x00";
pub const OVMF_ABORT: &[u8] = b"\x00\x05\x00\x08User aborted the transfer\x00";
pub const OVMF_FETCH: &[u8] =
    b"\x00\x01snponly.efi\x00octet\x00blksize\x001468\x00windowsize\x004\x00";

/// Other typical requests and packets.
pub const OTHER: &[&[u8]] = &[
    // RFC 1350 plain, both modes; tftp-hpa's client with every option.
    b"\x00\x01pxelinux.0\x00octet\x00",
    b"\x00\x01pxelinux.cfg/default\x00netascii\x00",
    b"\x00\x01boot.img\x00octet\x00tsize\x000\x00blksize\x001468\x00timeout\x001\x00windowsize\x0016\x00",
    b"\x00\x01BOOT.IMG\x00OCTET\x00BLKSIZE\x0065464\x00",
    // Padded with NULs; an unknown option; a duplicate.
    b"\x00\x01boot.img\x00octet\x00\x00\x00",
    b"\x00\x01boot.img\x00octet\x00multicast\x00\x00blksize\x00512\x00",
    b"\x00\x01boot.img\x00octet\x00blksize\x001024\x00blksize\x00x\x00",
    // An upload, the obsolete mail mode.
    b"\x00\x02upload.bin\x00octet\x00",
    b"\x00\x01boot.img\x00mail\x00",
    // DATA, ACK (plain, rolled over, padded), ERROR, OACK.
    b"\x00\x03\x00\x01hello",
    b"\x00\x04\x00\x00",
    b"\x00\x04\x00\x01",
    b"\x00\x04\xff\xff",
    b"\x00\x04\x00\x07\x00\x00",
    b"\x00\x05\x00\x01File not found\x00",
    b"\x00\x05\x00\x00no terminator",
    b"\x00\x06blksize\x001432\x00tsize\x00119524\x00windowsize\x004\x00",
];

/// Every raw datagram above.
pub fn datagrams() -> Vec<&'static [u8]> {
    let mut all: Vec<&[u8]> = Vec::new();
    all.extend_from_slice(IPXE_RRQS);
    all.extend_from_slice(PXELINUX_RRQS);
    all.extend_from_slice(&[OVMF_PROBE, OVMF_ABORT, OVMF_FETCH]);
    all.extend_from_slice(OTHER);
    all
}

/// The ACK datagram for `block`.
pub fn ack(block: u16) -> [u8; 4] {
    let b = block.to_be_bytes();
    [0, 4, b[0], b[1]]
}

/// Named inputs of one target.
pub type Inputs = Vec<(String, Vec<u8>)>;

/// Named seed inputs per target.
pub fn all() -> Vec<(&'static str, Inputs)> {
    let packets = datagrams()
        .into_iter()
        .enumerate()
        .map(|(i, d)| (format!("{i:02}"), d.to_vec()))
        .collect();
    vec![
        ("packet", packets),
        ("transfer", crate::transfer::seeds()),
        ("receive", crate::receive::seeds()),
        ("endpoint", crate::endpoint::seeds()),
    ]
}
