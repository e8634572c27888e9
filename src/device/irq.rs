//! Interrupts: the eventfds a client hands over with DEVICE_SET_IRQS and the
//! device's triggers.
//!
//! [`Irqs`] is `Sync`: `vfu_irq_trigger` may be called from any thread while
//! the context's own thread processes SET_IRQS. INTx, MSI and MSI-X share one
//! vector table (only one of them is in use at a time), ERR and REQ have a
//! single eventfd each, as in upstream libvfio-user.

use std::os::fd::OwnedFd;
use std::sync::Mutex;

use crate::error::{Errno, Result};
use crate::protocol::*;

/// IRQ index of INTx.
pub const INTX: u32 = 0;
/// IRQ index of MSI.
pub const MSI: u32 = 1;
/// IRQ index of MSI-X.
pub const MSIX: u32 = 2;
/// IRQ index of the error interrupt.
pub const ERR: u32 = 3;
/// IRQ index of the device request interrupt.
pub const REQ: u32 = 4;
/// Number of IRQ indexes.
pub const NUM_IRQ_TYPES: usize = 5;

/// An interrupt index (`vfu_dev_irq_type`), for
/// [`Context::setup_irq_count`](super::Context::setup_irq_count) and
/// friends, which also take the raw `u32` values above.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum IrqType {
    /// Legacy INTx line ([`INTX`]).
    Intx = INTX,
    /// MSI ([`MSI`]).
    Msi = MSI,
    /// MSI-X ([`MSIX`]).
    Msix = MSIX,
    /// Error interrupt ([`ERR`]), one vector.
    Err = ERR,
    /// Device request interrupt ([`REQ`]), one vector.
    Req = REQ,
}

impl IrqType {
    /// Every index, in order.
    pub const ALL: [IrqType; NUM_IRQ_TYPES] = [
        IrqType::Intx,
        IrqType::Msi,
        IrqType::Msix,
        IrqType::Err,
        IrqType::Req,
    ];

    /// The index for a raw value, if it is one.
    pub fn from_raw(index: u32) -> Option<IrqType> {
        IrqType::ALL.get(index as usize).copied()
    }
}

impl From<IrqType> for u32 {
    fn from(t: IrqType) -> u32 {
        t as u32
    }
}

impl TryFrom<u32> for IrqType {
    type Error = Errno;
    /// `EINVAL` for an unknown index.
    fn try_from(index: u32) -> Result<IrqType> {
        IrqType::from_raw(index).ok_or(Errno::EINVAL)
    }
}

#[derive(Debug, Default)]
struct Vectors {
    shared: Vec<Option<OwnedFd>>,
    err: Option<OwnedFd>,
    req: Option<OwnedFd>,
    /// Per shared vector: masked by the client (only tracked for maskable
    /// indexes).
    masked: Vec<bool>,
    /// Per shared vector: triggered while masked (the pending bit array).
    pending: Vec<bool>,
}

impl Vectors {
    fn slot(&mut self, index: u32, sub: usize) -> Option<&mut Option<OwnedFd>> {
        match index {
            ERR => Some(&mut self.err),
            REQ => Some(&mut self.req),
            _ => self.shared.get_mut(sub),
        }
    }
}

/// A change of mask state requested by the client, to report to the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskChange {
    /// Interrupt index (`INTX`, `MSI`, ...).
    pub index: u32,
    /// First vector concerned.
    pub start: u32,
    /// Number of vectors.
    pub count: u32,
    /// Masked (true) or unmasked.
    pub mask: bool,
}

/// The interrupt state of a realized context.
#[derive(Debug)]
pub struct Irqs {
    counts: [u32; NUM_IRQ_TYPES],
    /// Indexes whose MASK/UNMASK the library honours (reported as
    /// `VFIO_IRQ_INFO_MASKABLE`).
    maskable: [bool; NUM_IRQ_TYPES],
    vectors: Mutex<Vectors>,
}

fn signal(fd: &OwnedFd) -> Result<()> {
    match nix::unistd::write(fd, &1u64.to_ne_bytes()) {
        Ok(8) => Ok(()),
        Ok(_) => Err(Errno::EAGAIN),
        Err(e) => Err(e.into()),
    }
}

/// Whether a client's fd may serve as an interrupt eventfd. Sockets and
/// pipes are refused: signalling one whose other end is closed raises
/// SIGPIPE, which kills the server process unless it ignores the signal
/// (upstream installs any fd and has that problem). The kernel's VFIO only
/// takes eventfds here, so nothing a real client sends is refused.
fn signalable(fd: &OwnedFd) -> bool {
    match nix::sys::stat::fstat(fd) {
        Ok(st) => !matches!(st.st_mode & libc::S_IFMT, libc::S_IFSOCK | libc::S_IFIFO),
        Err(_) => false,
    }
}

impl Irqs {
    /// Creates the tables for the given per-index vector counts; masking is
    /// left to the device, as upstream does.
    pub fn new(counts: [u32; NUM_IRQ_TYPES]) -> Irqs {
        Irqs::with_masking(counts, [false; NUM_IRQ_TYPES])
    }

    /// Like [`Irqs::new`], and for each index with `maskable` set the
    /// library honours the client's MASK/UNMASK itself: a vector triggered
    /// while masked is not signalled but marked pending, and is signalled
    /// when unmasked. Such indexes report `VFIO_IRQ_INFO_MASKABLE`.
    pub fn with_masking(counts: [u32; NUM_IRQ_TYPES], maskable: [bool; NUM_IRQ_TYPES]) -> Irqs {
        let max = counts.iter().copied().max().unwrap_or(0) as usize;
        let mut shared = Vec::new();
        shared.resize_with(max, || None);
        Irqs {
            counts,
            maskable,
            vectors: Mutex::new(Vectors {
                shared,
                err: None,
                req: None,
                masked: vec![false; max],
                pending: vec![false; max],
            }),
        }
    }

    /// Whether vector `sub` of the shared table is pending (triggered while
    /// masked), for a device emulating an MSI-X Pending Bit Array.
    pub fn is_pending(&self, sub: u32) -> bool {
        self.lock()
            .pending
            .get(sub as usize)
            .copied()
            .unwrap_or(false)
    }

    /// Whether vector `sub` of the shared table is masked by the client.
    pub fn is_masked(&self, sub: u32) -> bool {
        self.lock()
            .masked
            .get(sub as usize)
            .copied()
            .unwrap_or(false)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vectors> {
        // A panic while holding this lock cannot leave the table inconsistent
        // (every update is a single assignment), so poisoning is ignored.
        self.vectors.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of vectors of an IRQ index.
    pub fn count(&self, index: u32) -> u32 {
        self.counts.get(index as usize).copied().unwrap_or(0)
    }

    /// Size of the shared INTx/MSI/MSI-X table.
    pub fn max_vectors(&self) -> usize {
        self.lock().shared.len()
    }

    /// `vfu_irq_trigger`: signals vector `sub` of the shared table.
    /// `EINVAL` when out of range, `ENOENT` when the client gave no eventfd.
    pub fn trigger(&self, sub: u32) -> Result<()> {
        let mut v = self.lock();
        let i = sub as usize;
        match v.shared.get(i) {
            None => Err(Errno::EINVAL),
            Some(None) => Err(Errno::ENOENT),
            Some(Some(_)) if v.masked[i] => {
                v.pending[i] = true;
                Ok(())
            }
            Some(Some(fd)) => signal(fd),
        }
    }

    /// Signals the ERR or REQ interrupt (a device-side extension).
    pub fn trigger_special(&self, index: u32) -> Result<()> {
        let v = self.lock();
        let fd = match index {
            ERR => v.err.as_ref(),
            REQ => v.req.as_ref(),
            _ => return Err(Errno::EINVAL),
        };
        fd.map_or(Err(Errno::ENOENT), signal)
    }

    /// Whether vector `sub` of `index` has an eventfd.
    pub fn has_eventfd(&self, index: u32, sub: u32) -> bool {
        let mut v = self.lock();
        matches!(v.slot(index, sub as usize), Some(Some(_)))
    }

    /// Closes every eventfd (on disconnect).
    pub fn reset(&self) {
        let mut v = self.lock();
        v.shared.iter_mut().for_each(|s| *s = None);
        v.err = None;
        v.req = None;
        v.masked.iter_mut().for_each(|m| *m = false);
        v.pending.iter_mut().for_each(|p| *p = false);
    }

    /// DEVICE_GET_IRQ_INFO.
    pub fn handle_get_info(&self, payload: &[u8]) -> Result<Vec<u8>> {
        if payload.len() < IRQ_INFO_SIZE || (payload.u32_at(0)? as usize) < IRQ_INFO_SIZE {
            return Err(Errno::EINVAL);
        }
        let index = payload.u32_at(8)?;
        if index as usize >= NUM_IRQ_TYPES {
            return Err(Errno::EINVAL);
        }
        let mut out = Vec::with_capacity(IRQ_INFO_SIZE);
        out.put_u32(IRQ_INFO_SIZE as u32);
        out.put_u32(if self.maskable[index as usize] {
            IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE
        } else {
            IRQ_INFO_EVENTFD
        });
        out.put_u32(index);
        out.put_u32(self.count(index));
        Ok(out)
    }

    /// DEVICE_SET_IRQS. Returns the mask change to report to the device, if
    /// the request was a MASK or UNMASK.
    pub fn handle_set(&self, payload: &[u8], fds: &mut Vec<OwnedFd>) -> Result<Option<MaskChange>> {
        if payload.len() < IRQ_SET_SIZE || (payload.u32_at(0)? as usize) < IRQ_SET_SIZE {
            return Err(Errno::EINVAL);
        }
        let flags = payload.u32_at(4)?;
        let index = payload.u32_at(8)?;
        let start = payload.u32_at(12)?;
        let count = payload.u32_at(16)?;
        let action = flags & IRQ_SET_ACTION_TYPE_MASK;
        let dtype = flags & IRQ_SET_DATA_TYPE_MASK;
        let data = &payload[IRQ_SET_SIZE..];
        let special = index == ERR || index == REQ;
        let valid = !(dtype == IRQ_SET_DATA_BOOL && data.len() != count as usize)
            && (index as usize) < NUM_IRQ_TYPES
            && matches!(
                action,
                IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER
            )
            && matches!(
                dtype,
                IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD
            )
            && start < self.count(index)
            && start.saturating_add(count) <= self.count(index)
            && !(special && action != IRQ_SET_ACTION_TRIGGER)
            && !(special && count > 1)
            && !(count == 0 && start != 0)
            && !(count == 0 && (action != IRQ_SET_ACTION_TRIGGER || dtype != IRQ_SET_DATA_NONE))
            && (fds.is_empty() || dtype == IRQ_SET_DATA_EVENTFD)
            && (fds.is_empty() || fds.len() == count as usize);
        if !valid || fds.iter().any(|fd| !signalable(fd)) {
            return Err(Errno::EINVAL);
        }
        if action != IRQ_SET_ACTION_TRIGGER {
            let mask = action == IRQ_SET_ACTION_MASK;
            if self.maskable[index as usize] && !special {
                let mut v = self.lock();
                for i in start as usize..(start as usize + count as usize) {
                    if let Some(m) = v.masked.get_mut(i) {
                        *m = mask;
                    }
                    if !mask && v.pending.get(i) == Some(&true) {
                        v.pending[i] = false;
                        if let Some(Some(fd)) = v.shared.get(i) {
                            signal(fd)?;
                        }
                    }
                }
            }
            return Ok(Some(MaskChange {
                index,
                start,
                count,
                mask: action == IRQ_SET_ACTION_MASK,
            }));
        }
        let mut v = self.lock();
        let range = start as usize..(start as usize + count as usize);
        if (dtype == IRQ_SET_DATA_NONE && count == 0)
            || (dtype == IRQ_SET_DATA_EVENTFD && fds.is_empty())
        {
            // Disable: close the eventfds of the range (all of them for count 0).
            // Upstream's loop bound forgets `start`; we close exactly the range.
            let range = if count == 0 {
                0..self.count(index) as usize
            } else {
                range
            };
            for i in range {
                if let Some(s) = v.slot(index, i) {
                    *s = None;
                }
            }
            return Ok(None);
        }
        match dtype {
            IRQ_SET_DATA_NONE => {
                for i in range {
                    if let Some(Some(fd)) = v.slot(index, i) {
                        signal(fd)?;
                    }
                }
            }
            IRQ_SET_DATA_BOOL => {
                for (i, b) in range.zip(data) {
                    if *b == 1 {
                        if let Some(Some(fd)) = v.slot(index, i) {
                            signal(fd)?;
                        }
                    }
                }
            }
            _ => {
                for (i, fd) in range.zip(fds.drain(..)) {
                    if let Some(s) = v.slot(index, i) {
                        *s = Some(fd);
                    }
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eventfd() -> OwnedFd {
        use nix::sys::eventfd::{EfdFlags, EventFd};
        EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .unwrap()
            .into()
    }

    fn read_count(fd: &OwnedFd) -> u64 {
        let mut v = [0u8; 8];
        match nix::unistd::read(fd, &mut v) {
            Ok(8) => u64::from_ne_bytes(v),
            _ => 0,
        }
    }

    fn set(flags: u32, index: u32, start: u32, count: u32, data: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        p.put_u32((IRQ_SET_SIZE + data.len()) as u32);
        p.put_u32(flags);
        p.put_u32(index);
        p.put_u32(start);
        p.put_u32(count);
        p.extend_from_slice(data);
        p
    }

    #[test]
    fn eventfds_installed_triggered_and_disabled() {
        let irqs = Irqs::new([1, 0, 4, 1, 1]);
        let a = eventfd();
        let b = eventfd();
        let a2 = a.try_clone().unwrap();
        let mut fds = vec![a, b];
        let p = set(
            IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD,
            MSIX,
            1,
            2,
            &[],
        );
        assert_eq!(irqs.handle_set(&p, &mut fds), Ok(None));
        assert!(fds.is_empty());
        assert_eq!(irqs.trigger(0), Err(Errno::ENOENT));
        irqs.trigger(1).unwrap();
        assert_eq!(read_count(&a2), 1);
        assert_eq!(irqs.trigger(4), Err(Errno::EINVAL));
        // DATA_BOOL triggers only the set entries.
        let p = set(
            IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_BOOL,
            MSIX,
            1,
            2,
            &[1, 0],
        );
        irqs.handle_set(&p, &mut vec![]).unwrap();
        assert_eq!(read_count(&a2), 1);
        // Disabling vector 1..2 leaves vector 2 in place.
        let p = set(
            IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD,
            MSIX,
            1,
            1,
            &[],
        );
        irqs.handle_set(&p, &mut vec![]).unwrap();
        assert_eq!(irqs.trigger(1), Err(Errno::ENOENT));
        assert!(irqs.has_eventfd(MSIX, 2));
        irqs.reset();
        assert!(!irqs.has_eventfd(MSIX, 2));
    }

    #[test]
    fn invalid_requests_are_refused() {
        let irqs = Irqs::new([1, 0, 4, 1, 1]);
        let t = IRQ_SET_ACTION_TRIGGER;
        let cases = [
            set(t | IRQ_SET_DATA_NONE, 9, 0, 1, &[]),
            set(t | IRQ_SET_DATA_NONE, MSIX, 4, 1, &[]),
            set(t | IRQ_SET_DATA_NONE, MSIX, 3, 2, &[]),
            set(t | IRQ_SET_DATA_NONE, MSIX, 1, u32::MAX, &[]),
            set(IRQ_SET_ACTION_MASK | IRQ_SET_DATA_NONE, ERR, 0, 1, &[]),
            set(t | IRQ_SET_DATA_BOOL, MSIX, 0, 2, &[1]),
            set(t | IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL, MSIX, 0, 1, &[]),
            set(
                IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_NONE,
                MSIX,
                0,
                1,
                &[],
            ),
            set(IRQ_SET_ACTION_MASK | IRQ_SET_DATA_NONE, MSIX, 0, 0, &[]),
            set(t | IRQ_SET_DATA_NONE, MSI, 0, 1, &[]),
        ];
        for c in &cases {
            assert_eq!(irqs.handle_set(c, &mut vec![]), Err(Errno::EINVAL), "{c:?}");
        }
        assert_eq!(irqs.handle_set(&[0u8; 4], &mut vec![]), Err(Errno::EINVAL));
        // fds with a non-eventfd data type, or the wrong number of them.
        let p = set(t | IRQ_SET_DATA_NONE, MSIX, 0, 1, &[]);
        assert_eq!(
            irqs.handle_set(&p, &mut vec![eventfd()]),
            Err(Errno::EINVAL)
        );
        let p = set(t | IRQ_SET_DATA_EVENTFD, MSIX, 0, 2, &[]);
        assert_eq!(
            irqs.handle_set(&p, &mut vec![eventfd()]),
            Err(Errno::EINVAL)
        );
    }

    #[test]
    fn sockets_and_pipes_are_refused_as_eventfds() {
        // Regression (found by the session fuzzer): a socket whose peer is
        // gone, installed as an interrupt eventfd, killed the process with
        // SIGPIPE when the device triggered the interrupt.
        let irqs = Irqs::new([0, 0, 2, 1, 1]);
        let t = IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD;
        let (sock, peer) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(peer);
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        drop(rd);
        for bad in [OwnedFd::from(sock), wr] {
            let mut fds = vec![eventfd(), bad];
            let r = irqs.handle_set(&set(t, MSIX, 0, 2, &[]), &mut fds);
            assert_eq!(r, Err(Errno::EINVAL));
            // Nothing was installed and the fds stay the caller's.
            assert_eq!(fds.len(), 2);
            assert!(!irqs.has_eventfd(MSIX, 0));
        }
        let r = irqs.handle_set(&set(t, ERR, 0, 1, &[]), &mut vec![eventfd()]);
        assert_eq!(r, Ok(None));
        assert!(irqs.has_eventfd(ERR, 0));
    }

    #[test]
    fn mask_reports_change_and_err_req_work() {
        let irqs = Irqs::new([0, 0, 4, 1, 1]);
        let p = set(IRQ_SET_ACTION_MASK | IRQ_SET_DATA_NONE, MSIX, 1, 2, &[]);
        assert_eq!(
            irqs.handle_set(&p, &mut vec![]),
            Ok(Some(MaskChange {
                index: MSIX,
                start: 1,
                count: 2,
                mask: true
            }))
        );
        let e = eventfd();
        let e2 = e.try_clone().unwrap();
        let p = set(
            IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD,
            ERR,
            0,
            1,
            &[],
        );
        irqs.handle_set(&p, &mut vec![e]).unwrap();
        irqs.trigger_special(ERR).unwrap();
        assert_eq!(read_count(&e2), 1);
        assert_eq!(irqs.trigger_special(REQ), Err(Errno::ENOENT));
    }

    #[test]
    fn maskable_vectors_hold_triggers_until_unmasked() {
        let mut maskable = [false; NUM_IRQ_TYPES];
        maskable[MSIX as usize] = true;
        let irqs = Irqs::with_masking([0, 0, 2, 1, 1], maskable);
        let e = eventfd();
        let e2 = e.try_clone().unwrap();
        let p = set(
            IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD,
            MSIX,
            0,
            1,
            &[],
        );
        irqs.handle_set(&p, &mut vec![e]).unwrap();
        let mask = set(IRQ_SET_ACTION_MASK | IRQ_SET_DATA_NONE, MSIX, 0, 1, &[]);
        irqs.handle_set(&mask, &mut vec![]).unwrap();
        assert!(irqs.is_masked(0));
        irqs.trigger(0).unwrap();
        assert_eq!(read_count(&e2), 0, "masked: not signalled");
        assert!(irqs.is_pending(0));
        let unmask = set(IRQ_SET_ACTION_UNMASK | IRQ_SET_DATA_NONE, MSIX, 0, 1, &[]);
        irqs.handle_set(&unmask, &mut vec![]).unwrap();
        assert_eq!(read_count(&e2), 1, "pending vector delivered on unmask");
        assert!(!irqs.is_pending(0) && !irqs.is_masked(0));
        irqs.trigger(0).unwrap();
        assert_eq!(read_count(&e2), 1);
        let mut info = Vec::new();
        info.put_u32(16);
        info.put_u32(0);
        info.put_u32(MSIX);
        info.put_u32(0);
        let r = irqs.handle_get_info(&info).unwrap();
        assert_eq!(r[..].u32_at(4), Ok(IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE));
        info[8] = INTX as u8;
        let r = irqs.handle_get_info(&info).unwrap();
        assert_eq!(
            r[..].u32_at(4),
            Ok(IRQ_INFO_EVENTFD),
            "only opted-in indexes"
        );
    }

    #[test]
    fn get_info_reports_counts() {
        let irqs = Irqs::new([1, 2, 3, 1, 1]);
        let mut p = Vec::new();
        p.put_u32(16);
        p.put_u32(0);
        p.put_u32(MSIX);
        p.put_u32(0);
        let r = irqs.handle_get_info(&p).unwrap();
        assert_eq!(r[..].u32_at(12), Ok(3));
        assert_eq!(r[..].u32_at(4), Ok(IRQ_INFO_EVENTFD));
        p[8] = 5;
        assert_eq!(irqs.handle_get_info(&p), Err(Errno::EINVAL));
        assert_eq!(irqs.handle_get_info(&p[..15]), Err(Errno::EINVAL));
    }

    #[test]
    fn irq_type_round_trips() {
        for (i, t) in IrqType::ALL.iter().enumerate() {
            assert_eq!(u32::from(*t), i as u32);
            assert_eq!(IrqType::try_from(i as u32), Ok(*t));
        }
        assert_eq!(u32::from(IrqType::Msix), MSIX);
        assert_eq!(IrqType::from_raw(NUM_IRQ_TYPES as u32), None);
        assert_eq!(IrqType::try_from(99), Err(Errno::EINVAL));
    }
}
