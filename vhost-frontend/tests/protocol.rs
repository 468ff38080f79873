//! Protocol-level tests: this file plays the VMM (the vhost crate's
//! frontend side) and the guest driver (split virtqueues in a shared memfd)
//! against a real `raftblk-vhost` process serving a volume of a real
//! 3-node cluster. No QEMU.

mod common;

use std::os::fd::FromRawFd as _;
use std::time::{Duration, Instant};

use common::*;

use raftblk_cluster_tests::payload;
use raftblk_vhost::virtio_blk::*;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vm_memory::{Address as _, Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

#[test]
fn negotiation_config_and_io_on_both_queues() -> anyhow::Result<()> {
    let size: u64 = 16 << 20;
    let (_cluster, _dir, mut vhost, volume_id) = setup("proto", size)?;
    let (mut drv, features, pf, config) = Driver::connect(&vhost.socket, 2)?;

    // Features and protocol features.
    for (bit, name) in [
        (F_VERSION_1, "VERSION_1"),
        (F_SEG_MAX, "SEG_MAX"),
        (F_SIZE_MAX, "SIZE_MAX"),
        (F_BLK_SIZE, "BLK_SIZE"),
        (F_TOPOLOGY, "TOPOLOGY"),
        (F_FLUSH, "FLUSH"),
        (F_MQ, "MQ"),
        (F_DISCARD, "DISCARD"),
        (F_WRITE_ZEROES, "WRITE_ZEROES"),
        (F_RING_EVENT_IDX, "EVENT_IDX"),
        (F_PROTOCOL_FEATURES, "PROTOCOL_FEATURES"),
    ] {
        assert!(features & bit != 0, "feature {name} not offered");
    }
    assert_eq!(features & F_RO, 0, "RO offered for a writable disk");
    for f in [
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::MQ,
        VhostUserProtocolFeatures::REPLY_ACK,
        VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
    ] {
        assert!(pf.contains(f), "protocol feature {f:?} not offered");
    }
    assert_eq!(drv.fe.get_queue_num()?, 2);

    // Config space from the volume's size.
    let le64 = |o: usize| u64::from_le_bytes(config[o..o + 8].try_into().unwrap_or_default());
    let le32 = |o: usize| u32::from_le_bytes(config[o..o + 4].try_into().unwrap_or_default());
    assert_eq!(le64(0), size / 512, "capacity in sectors");
    assert_eq!(le32(20), 512, "logical block size");
    assert_eq!(config[24], 3, "physical block = 4096");
    assert_eq!(
        u16::from_le_bytes([config[34], config[35]]),
        2,
        "num_queues"
    );
    assert!(le32(12) >= 1, "seg_max");
    assert!(
        le32(36) >= 8 && le32(48) >= 8,
        "discard / write-zeroes limits"
    );

    // Write on queue 0, read on queue 1 (and the other way round).
    let data = payload(1, 64 * 1024);
    assert_eq!(drv.write(0, 8, &data)?, S_OK);
    let (s, got) = drv.read(1, 8, 64 * 1024)?;
    assert_eq!(s, S_OK);
    assert!(got == data, "read back on queue 1");
    // Sub-4K write (read-modify-write in the cluster).
    let small = payload(2, 512);
    assert_eq!(drv.write(1, 9, &small)?, S_OK);
    let (s, got) = drv.read(0, 8, 2048)?;
    assert_eq!(s, S_OK);
    assert!(
        got[..512] == data[..512] && got[512..1024] == small[..] && got[1024..] == data[1024..2048]
    );

    // Flush.
    let h = drv.header(T_FLUSH, 0)?;
    let st = drv.status();
    assert_eq!(drv.run(0, &[h, st])?, (S_OK, 1));

    // Discard and write-zeroes (with UNMAP) read back as zeros.
    assert_eq!(drv.discard(0, T_DISCARD, 8, 16, 0)?, S_OK);
    let (_, got) = drv.read(0, 8, 8192)?;
    assert!(got.iter().all(|&b| b == 0), "discarded range");
    assert_eq!(drv.discard(1, T_WRITE_ZEROES, 24, 8, WZ_FLAG_UNMAP)?, S_OK);
    let (_, got) = drv.read(1, 8, 64 * 1024)?;
    assert!(got[..8192].iter().all(|&b| b == 0) && got[8192..12288].iter().all(|&b| b == 0));
    assert!(
        got[12288..] == data[12288..],
        "outside the ranges untouched"
    );

    // GET_ID: a stable serial.
    let h = drv.header(T_GET_ID, 0)?;
    let st = drv.status();
    let (s, used) = drv.run(0, &[h, d(DATA, 20, true), st])?;
    assert_eq!((s, used), (S_OK, 21));
    let mut id = [0u8; 20];
    drv.mem.read_slice(&mut id, GuestAddress(DATA))?;
    assert_eq!(&id[..], &serial(volume_id)[..]);
    assert!(id.starts_with(b"raftblk-"));

    // The daemon serves a new connection after this one goes away.
    drop(drv);
    std::thread::sleep(Duration::from_millis(300));
    assert!(vhost.is_running());
    let (mut drv2, _, _, _) = Driver::connect(&vhost.socket, 2)?;
    let (s, got) = drv2.read(0, 8 + 24, 4096)?;
    assert_eq!(s, S_OK);
    assert!(
        got == data[12288..16384],
        "data through the second connection"
    );
    Ok(())
}

#[test]
fn malformed_chains_get_errors_and_the_daemon_keeps_serving() -> anyhow::Result<()> {
    let size: u64 = 8 << 20;
    let (_cluster, _dir, mut vhost, _) = setup("hostile", size)?;
    let (mut drv, _, _, _) = Driver::connect(&vhost.socket, 2)?;
    let good = payload(9, 4096);
    assert_eq!(drv.write(0, 0, &good)?, S_OK);
    let sectors = size / 512;
    // Each case is built (with its own header) right before it runs.
    type Build = Box<dyn Fn(&Driver) -> anyhow::Result<Vec<D>>>;
    let builds: Vec<(&str, Build, u8)> = vec![
        (
            "short header",
            Box::new(|_: &Driver| {
                Ok(vec![
                    d(HDR, 8, false),
                    d(DATA, 512, true),
                    d(STATUS, 1, true),
                ])
            }),
            S_IOERR,
        ),
        (
            "write-only header",
            Box::new(|dr: &Driver| {
                let mut h = dr.header(T_IN, 0)?;
                h.write = true;
                Ok(vec![h, d(DATA, 512, true), d(STATUS, 1, true)])
            }),
            S_IOERR,
        ),
        (
            "read into a device-readable buffer",
            Box::new(|dr: &Driver| {
                Ok(vec![
                    dr.header(T_IN, 0)?,
                    d(DATA, 512, false),
                    d(STATUS, 1, true),
                ])
            }),
            S_IOERR,
        ),
        (
            "write from a device-writable buffer",
            Box::new(|dr: &Driver| {
                Ok(vec![
                    dr.header(T_OUT, 0)?,
                    d(DATA, 512, true),
                    d(STATUS, 1, true),
                ])
            }),
            S_IOERR,
        ),
        (
            "buffer outside guest memory",
            Box::new(|dr: &Driver| {
                Ok(vec![
                    dr.header(T_IN, 0)?,
                    d(0x4000_0000, 512, true),
                    d(STATUS, 1, true),
                ])
            }),
            S_IOERR,
        ),
        (
            "buffer straddling the end of memory",
            Box::new(|dr: &Driver| {
                Ok(vec![
                    dr.header(T_IN, 0)?,
                    d(MEM_BYTES as u64 - 512, 1024, true),
                    d(STATUS, 1, true),
                ])
            }),
            S_IOERR,
        ),
        (
            "address + length overflows",
            Box::new(|dr: &Driver| {
                Ok(vec![
                    dr.header(T_IN, 0)?,
                    d(u64::MAX - 100, 512, true),
                    d(STATUS, 1, true),
                ])
            }),
            S_IOERR,
        ),
        (
            "sector past the end",
            Box::new(move |dr: &Driver| {
                Ok(vec![
                    dr.header(T_IN, sectors)?,
                    d(DATA, 512, true),
                    d(STATUS, 1, true),
                ])
            }),
            S_IOERR,
        ),
        (
            "sector overflows",
            Box::new(|dr: &Driver| {
                Ok(vec![
                    dr.header(T_OUT, u64::MAX - 1)?,
                    d(DATA, 1024, false),
                    d(STATUS, 1, true),
                ])
            }),
            S_IOERR,
        ),
        (
            "length not a multiple of 512",
            Box::new(|dr: &Driver| {
                Ok(vec![
                    dr.header(T_IN, 0)?,
                    d(DATA, 700, true),
                    d(STATUS, 1, true),
                ])
            }),
            S_IOERR,
        ),
        (
            "unknown request type",
            Box::new(|dr: &Driver| Ok(vec![dr.header(77, 0)?, d(STATUS, 1, true)])),
            S_UNSUPP,
        ),
        (
            "discard with the UNMAP flag",
            Box::new(|dr: &Driver| {
                let mut r = [0u8; 16];
                r[8..12].copy_from_slice(&8u32.to_le_bytes());
                r[12..16].copy_from_slice(&1u32.to_le_bytes());
                dr.mem.write_slice(&r, GuestAddress(DATA + 0x10000))?;
                Ok(vec![
                    dr.header(T_DISCARD, 0)?,
                    d(DATA + 0x10000, 16, false),
                    d(STATUS, 1, true),
                ])
            }),
            S_UNSUPP,
        ),
    ];
    for (name, build, code) in &builds {
        let chain = build(&drv)?;
        let (s, used) = drv.run(0, &chain)?;
        assert_eq!((s, used), (*code, 1), "case {name}");
        // The daemon still serves good requests, and nothing changed.
        let (s, got) = drv.read(1, 0, 4096)?;
        assert_eq!(s, S_OK, "after case {name}");
        assert!(got == good, "data changed after case {name}");
    }
    // Status descriptor not writable: nothing may be written to it; the
    // chain is returned with length 0.
    let h = drv.header(T_IN, 0)?;
    let (s, used) = drv.run(0, &[h, d(DATA, 512, true), d(STATUS, 1, false)])?;
    assert_eq!((s, used), (0xAA, 0), "read-only status byte was written");
    // Too many segments (through an indirect table: more than seg_max).
    let h = drv.header(T_IN, 0)?;
    let mut chain = vec![h];
    chain.extend((0..300u64).map(|i| d(DATA + i * 512, 512, true)));
    chain.push(d(STATUS, 1, true));
    drv.mem.write_obj(0xAAu8, GuestAddress(STATUS))?;
    let used = drv.submit(1, &chain, true)?;
    let s: u8 = drv.mem.read_obj(GuestAddress(STATUS))?;
    assert_eq!((s, used), (S_IOERR, 1), "too many segments");
    // A good indirect chain works.
    let h = drv.header(T_IN, 0)?;
    drv.mem.write_obj(0xAAu8, GuestAddress(STATUS))?;
    let used = drv.submit(1, &[h, d(DATA, 4096, true), d(STATUS, 1, true)], true)?;
    assert_eq!(used, 4097);
    // Chains whose `next` fields loop, or leave their table: cut off at the
    // table's length each of these would look like a valid request. None
    // may be executed (the write's sectors keep `good`); the descriptor
    // that closes the loop is the status byte and gets IOERR.
    let other = payload(10, 4096);
    type BuildTable = Box<dyn Fn(&Driver) -> anyhow::Result<Vec<(D, Option<u16>)>>>;
    let loops: Vec<(&str, BuildTable, bool)> = vec![
        (
            "indirect table: header -> data -> status -> header",
            Box::new(|dr: &Driver| {
                Ok(vec![
                    (dr.header(T_OUT, 0)?, Some(1)),
                    (d(DATA, 4096, false), Some(2)),
                    (d(STATUS, 1, true), Some(0)),
                ])
            }),
            true,
        ),
        (
            "indirect table: header -> data -> status -> data",
            Box::new(|dr: &Driver| {
                Ok(vec![
                    (dr.header(T_OUT, 0)?, Some(1)),
                    (d(DATA, 4096, false), Some(2)),
                    (d(STATUS, 1, true), Some(1)),
                ])
            }),
            true,
        ),
        (
            "indirect table: status's next beyond the table",
            Box::new(|dr: &Driver| {
                Ok(vec![
                    (dr.header(T_OUT, 0)?, Some(1)),
                    (d(DATA, 4096, false), Some(2)),
                    (d(STATUS, 1, true), Some(3)),
                ])
            }),
            true,
        ),
        (
            "direct ring: flush header -> status -> header",
            Box::new(|dr: &Driver| {
                Ok(vec![
                    (dr.header(T_FLUSH, 0)?, Some(1)),
                    (d(STATUS, 1, true), Some(0)),
                ])
            }),
            false,
        ),
    ];
    for (name, build, indirect) in &loops {
        drv.mem.write_slice(&other, GuestAddress(DATA))?;
        let table = build(&drv)?;
        drv.mem.write_obj(0xAAu8, GuestAddress(STATUS))?;
        let used = drv.submit_table(1, &table, *indirect)?;
        let s: u8 = drv.mem.read_obj(GuestAddress(STATUS))?;
        assert_eq!((s, used), (S_IOERR, 1), "case {name}");
        let (s, got) = drv.read(1, 0, 4096)?;
        assert_eq!(s, S_OK, "after case {name}");
        assert!(got == good, "case {name} was executed");
    }
    // A head index outside the ring cannot be returned to the used ring:
    // it is dropped, and the queue keeps serving.
    drv.make_available(1, QSIZE)?;
    let (s, got) = drv.read(1, 0, 4096)?;
    assert_eq!(s, S_OK, "after a head index outside the ring");
    assert!(got == good);
    // Still alive, and the malformed requests were counted in its log.
    assert!(vhost.is_running());
    assert!(vhost.log_text().contains("malformed request from guest"));
    let (s, got) = drv.read(0, 0, 4096)?;
    assert_eq!(s, S_OK);
    assert!(got == good);
    Ok(())
}

fn memfd(name: &std::ffi::CStr, size: u64, flags: libc::c_uint) -> anyhow::Result<std::fs::File> {
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is
    // checked and then owned by the File.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    anyhow::ensure!(fd >= 0, "memfd_create failed");
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

fn log_bit(log: &vm_memory::MmapRegion<()>, gpa: u64) -> anyhow::Result<bool> {
    use vm_memory::VolatileMemory as _;
    let page = gpa / 4096;
    let byte: u8 = log
        .as_volatile_slice()
        .load((page / 8) as usize, std::sync::atomic::Ordering::SeqCst)?;
    Ok(byte & (1 << (page % 8)) != 0)
}

/// Live migration's dirty log: with LOG_ALL on, every guest-memory write of
/// the daemon (read payload, status byte, used ring) sets its page's bit
/// in the shared log, and no other page's; with LOG_ALL off again, nothing
/// is logged. Then the inflight region: one is handed out, handed back on
/// a new connection with a request marked in flight, and that request is
/// served without ever being made available again; regions that are not
/// ours (unsealed, wrong size) are refused and the daemon keeps serving.
#[test]
fn dirty_log_and_inflight_region() -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    use vhost::VhostUserDirtyLogRegion;
    let size: u64 = 16 << 20;
    let (_cluster, _dir, mut vhost, _) = setup("proto-log", size)?;
    let extra = Extra {
        protocol: VhostUserProtocolFeatures::LOG_SHMFD | VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        ..Extra::default()
    };
    let (mut drv, features, pf, _) = Driver::connect_with(&vhost.socket, 2, &extra)?;
    assert!(features & F_LOG_ALL != 0, "LOG_ALL offered");
    assert!(pf.contains(VhostUserProtocolFeatures::LOG_SHMFD));
    assert!(pf.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    // QEMU asks for the region before it sets up the rings; asking again
    // later (after a reset) gets a fresh one.
    let (inflight, region) = drv.fe.get_inflight_fd(&VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 2,
        queue_size: QSIZE,
    })?;
    assert!(inflight.mmap_size > 0 && inflight.num_queues == 2);
    let data = payload(7, 8192);
    assert_eq!(drv.write(0, 8, &data)?, S_OK);

    // Logging on.
    // Sealed against resizing, as QEMU makes it (the daemon insists).
    let logf = memfd(c"raftblk-test-log", 4096, libc::MFD_ALLOW_SEALING)?;
    // SAFETY: F_ADD_SEALS on a memfd this test owns, with valid flags.
    let rc = unsafe {
        libc::fcntl(
            logf.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    anyhow::ensure!(rc == 0, "seal the log");
    drv.fe.set_log_base(
        0,
        Some(VhostUserDirtyLogRegion {
            mmap_size: 4096,
            mmap_offset: 0,
            mmap_handle: logf.as_raw_fd(),
        }),
    )?;
    let want = features & !F_LOG_ALL;
    drv.fe.set_features(want | F_LOG_ALL)?;
    // SET_FEATURES has no reply: a request that has one orders it before
    // the kicks that follow (they bypass the socket).
    drv.fe.get_features()?;
    let log = vm_memory::MmapRegion::<()>::from_file(FileOffset::new(logf.try_clone()?, 0), 4096)?;
    let (st, got) = drv.read(0, 8, 8192)?;
    assert_eq!((st, got == data), (S_OK, true));
    for (what, gpa) in [
        ("read payload, first page", DATA),
        ("read payload, second page", DATA + 4096),
        ("status byte", STATUS),
        ("used ring of queue 0", 0x10000 + 0x2000),
    ] {
        assert!(log_bit(&log, gpa)?, "{what} at {gpa:#x} not logged");
    }
    for (what, gpa) in [
        ("request header (device-readable)", HDR),
        ("used ring of queue 1 (untouched)", 0x20000 + 0x2000),
        ("past the payload", DATA + 8192),
    ] {
        assert!(!log_bit(&log, gpa)?, "{what} at {gpa:#x} logged");
    }
    // Queue 1's used ring is logged once queue 1 answers.
    assert_eq!(drv.read(1, 8, 4096)?.0, S_OK);
    assert!(log_bit(&log, 0x20000 + 0x2000)?, "used ring of queue 1");
    // Logging off: clear the log, serve a read, nothing is set.
    drv.fe.set_features(want)?;
    drv.fe.get_features()?;
    {
        use vm_memory::VolatileMemory as _;
        log.as_volatile_slice().write_slice(&[0u8; 4096], 0)?;
    }
    assert_eq!(drv.read(0, 8, 4096)?.0, S_OK);
    for gpa in [DATA, STATUS, 0x12000] {
        assert!(!log_bit(&log, gpa)?, "{gpa:#x} logged with LOG_ALL off");
    }
    drop(drv);

    // Hand the region back on a new connection, with a read of sector 8
    // at head 0 of queue 0 marked in flight (as a daemon killed mid-I/O
    // leaves it): the daemon serves it from the region alone.
    let region_map = vm_memory::MmapRegion::<()>::from_file(
        FileOffset::new(region.try_clone()?, 0),
        inflight.mmap_size as usize,
    )?;
    let mark = {
        use vm_memory::VolatileMemory as _;
        let vs = region_map.as_volatile_slice();
        // Queue 0: version 1, desc_num QSIZE, used_idx 0, head 0 in flight.
        vs.store(1u16, 8, std::sync::atomic::Ordering::SeqCst)?;
        vs.store(QSIZE, 10, std::sync::atomic::Ordering::SeqCst)?;
        vs.store(0u16, 14, std::sync::atomic::Ordering::SeqCst)?;
        vs.store(1u8, 16, std::sync::atomic::Ordering::SeqCst)?;
        vs.store(5u64, 24, std::sync::atomic::Ordering::SeqCst)?;
        Ok::<(), anyhow::Error>(())
    };
    mark?;
    let extra = Extra {
        protocol: VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        inflight: Some((inflight, region.try_clone()?)),
        before_kick: Some(Box::new(|mem: &GuestMemoryMmap<()>, q: usize| {
            if q != 0 {
                return Ok(());
            }
            // The chain of head 0: header, 4 KiB read buffer, status.
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&T_IN.to_le_bytes());
            h[8..16].copy_from_slice(&8u64.to_le_bytes());
            mem.write_slice(&h, GuestAddress(HDR))?;
            mem.write_slice(&[0x55u8; 4096], GuestAddress(DATA))?;
            mem.write_obj(0xAAu8, GuestAddress(STATUS))?;
            let desc = 0x10000u64;
            for (i, (addr, len, flags, next)) in [
                (HDR, 16u32, F_NEXT, 1u16),
                (DATA, 4096, F_NEXT | F_WRITE, 2),
                (STATUS, 1, F_WRITE, 0),
            ]
            .into_iter()
            .enumerate()
            {
                let at = GuestAddress(desc + i as u64 * 16);
                mem.write_obj(addr, at)?;
                mem.write_obj(len, at.unchecked_add(8))?;
                mem.write_obj(flags, at.unchecked_add(12))?;
                mem.write_obj(next, at.unchecked_add(14))?;
            }
            // The guest had made head 0 available (avail idx 1).
            mem.write_obj(0u16, GuestAddress(desc + 0x1000 + 4))?;
            mem.write_obj(1u16, GuestAddress(desc + 0x1000 + 2))?;
            Ok(())
        })),
    };
    let (mut drv, _, _, _) = Driver::connect_with(&vhost.socket, 2, &extra)?;
    drv.queues[0].avail_idx = 1;
    assert_eq!(drv.wait_used(0, 0)?, 4097, "resubmitted read's used length");
    let mut buf = vec![0u8; 4096];
    drv.mem.read_slice(&mut buf, GuestAddress(DATA))?;
    assert_eq!(drv.mem.read_obj::<u8>(GuestAddress(STATUS))?, S_OK);
    assert_eq!(buf, data[..4096], "resubmitted read's data");
    // The avail ring continues after it.
    let (st, got) = drv.read(0, 8, 8192)?;
    assert_eq!((st, got == data), (S_OK, true));
    drop(drv);

    // Hostile regions: an unsealed file and a wrong size are refused, and
    // the daemon serves on.
    let plain = memfd(c"raftblk-test-plain", inflight.mmap_size, 0)?;
    let bad_size = VhostUserInflight {
        mmap_size: inflight.mmap_size + 4096,
        ..inflight
    };
    for (what, msg, file) in [
        ("unsealed", inflight, plain),
        ("wrong size", bad_size, region.try_clone()?),
    ] {
        let extra = Extra {
            protocol: VhostUserProtocolFeatures::INFLIGHT_SHMFD,
            inflight: Some((msg, file)),
            before_kick: None,
        };
        let refusals = || vhost.log_text().matches("inflight region refused").count();
        let before = refusals();
        // Whether the frontend sees the refusal depends on REPLY_ACK; the
        // daemon logs it and serves the connection without a region.
        if let Ok((mut d, _, _, _)) = Driver::connect_with(&vhost.socket, 2, &extra) {
            assert_eq!(
                d.read(0, 8, 4096)?.0,
                S_OK,
                "serving with a {what} region refused"
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while refusals() == before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(refusals(), before + 1, "{what} inflight region accepted");
        let (mut drv, _, _, _) = Driver::connect(&vhost.socket, 2)?;
        assert_eq!(
            drv.read(1, 8, 4096)?.0,
            S_OK,
            "serving after a {what} region"
        );
    }
    assert!(vhost.is_running(), "daemon died: {}", vhost.log_text());
    let log_text = vhost.log_text();
    assert!(log_text.contains("inflight region refused"), "{log_text}");
    assert!(
        log_text.contains("resubmitting requests from the inflight region"),
        "{log_text}"
    );
    Ok(())
}

/// Online resize at the protocol level: with BACKEND_REQ negotiated and a
/// backend channel set, growing the volume makes the daemon send
/// CONFIG_CHANGE_MSG on that channel; the config space then holds the new
/// capacity and I/O past the old end succeeds.
#[test]
fn config_change_message_after_grow() -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    let old: u64 = 16 << 20;
    let new: u64 = 32 << 20;
    let (cluster, _dir, vhost, _) = setup("proto-grow", old)?;
    let extra = Extra {
        protocol: VhostUserProtocolFeatures::BACKEND_REQ,
        ..Extra::default()
    };
    let (mut drv, _, pf, config) = Driver::connect_with(&vhost.socket, 2, &extra)?;
    assert!(pf.contains(VhostUserProtocolFeatures::BACKEND_REQ));
    assert_eq!(u64::from_le_bytes(config[0..8].try_into()?), old / 512);
    let (mut ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    drv.fe.set_backend_request_fd(&theirs)?;
    ours.set_read_timeout(Some(Duration::from_secs(20)))?;
    // Past the old end: refused before the grow.
    assert_eq!(drv.write(0, old / 512, &payload(3, 4096))?, S_IOERR);
    let rt = tokio::runtime::Runtime::new()?;
    let client = rt.block_on(cluster.client())?;
    rt.block_on(client.grow_volume("proto-grow", new))?;
    let mut hdr = [0u8; 12];
    ours.read_exact(&mut hdr)?;
    let code = u32::from_le_bytes(hdr[0..4].try_into()?);
    let flags = u32::from_le_bytes(hdr[4..8].try_into()?);
    let size = u32::from_le_bytes(hdr[8..12].try_into()?);
    assert_eq!((code, size), (2, 0), "CONFIG_CHANGE_MSG with no payload");
    if flags & 0x8 != 0 {
        // NEED_REPLY (REPLY_ACK is negotiated): ack with 0.
        let mut reply = Vec::new();
        reply.extend_from_slice(&2u32.to_le_bytes());
        reply.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
        reply.extend_from_slice(&8u32.to_le_bytes());
        reply.extend_from_slice(&0u64.to_le_bytes());
        ours.write_all(&reply)?;
    }
    let (_, config) = drv
        .fe
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])?;
    assert_eq!(u64::from_le_bytes(config[0..8].try_into()?), new / 512);
    let data = payload(4, 4096);
    assert_eq!(drv.write(0, old / 512, &data)?, S_OK);
    let (st, got) = drv.read(1, old / 512, 4096)?;
    assert_eq!((st, got == data), (S_OK, true));
    Ok(())
}
