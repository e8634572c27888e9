//! `VFIO_USER_DEVICE_FEATURE`: the migration features (capabilities, get
//! and set of the device state) and the DMA dirty-page logging features
//! (start, stop, report), in their GET, SET and PROBE flavours.

use super::*;

/// The operations (GET/SET/PROBE bits) a feature supports; 0 if unsupported.
/// Every feature, dirty-page logging included, needs migration support.
fn supported_ops(migration: bool, feature: u32) -> u32 {
    if !migration {
        return 0;
    }
    match feature {
        VFIO_DEVICE_FEATURE_MIGRATION | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT => {
            VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_PROBE
        }
        VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE => {
            VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_PROBE
        }
        VFIO_DEVICE_FEATURE_DMA_LOGGING_START | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP => {
            VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_PROBE
        }
        _ => 0,
    }
}

/// Handles `VFIO_USER_DEVICE_FEATURE`.
///
/// `payload` is the message body after the 16-byte header; `mig` is `None`
/// when the device registered no migration callbacks (then every feature is
/// refused with `EINVAL`). Returns the reply body:
///
/// * GET MIGRATION / MIG_DEVICE_STATE: the request's 8-byte header with
///   `argsz` = 16, then the capability flags or `{device_state, data_fd = 0}`;
/// * GET DMA_LOGGING_REPORT: the request's 32 bytes with `argsz` = 32 +
///   bitmap size, then the bitmap;
/// * SET and PROBE: a copy of the request.
///
/// Errors: `EINVAL` for a short payload, an unsupported feature or
/// operation, no operation, GET together with SET without PROBE, an `argsz`
/// smaller than the reply (GET) or than the payload (SET, PROBE), missing
/// feature data, a bad bitmap geometry; otherwise the callback's errno.
pub fn handle_device_feature(
    mig: Option<&Migration>,
    cbs: &dyn MigrationCallbacks,
    log: &dyn DirtyLogging,
    payload: &[u8],
) -> Result<Vec<u8>> {
    let argsz = get_u32(payload, 0)?;
    let flags = get_u32(payload, 4)?;
    let ops = flags & !VFIO_DEVICE_FEATURE_MASK;
    let feature = flags & VFIO_DEVICE_FEATURE_MASK;

    let supported = supported_ops(mig.is_some(), feature);
    if supported == 0 || ops & !supported != 0 {
        return Err(Errno::EINVAL);
    }
    // supported_ops is zero without migration, so this always succeeds.
    let mig = mig.ok_or(Errno::EINVAL)?;
    let argsz = usize::try_from(argsz).map_err(|_| Errno::EINVAL)?;

    match ops {
        VFIO_DEVICE_FEATURE_GET => feature_get(mig, log, feature, flags, argsz, payload),
        VFIO_DEVICE_FEATURE_SET => {
            if argsz < payload.len() {
                return Err(Errno::EINVAL);
            }
            feature_set(mig, cbs, log, feature, payload)?;
            Ok(payload.to_vec())
        }
        // PROBE may come with GET and/or SET, naming the operations probed
        // for; those were checked against `supported` above.
        _ if ops & VFIO_DEVICE_FEATURE_PROBE != 0 => {
            if argsz < payload.len() {
                return Err(Errno::EINVAL);
            }
            Ok(payload.to_vec())
        }
        _ => Err(Errno::EINVAL),
    }
}

fn feature_get(
    mig: &Migration,
    log: &dyn DirtyLogging,
    feature: u32,
    flags: u32,
    argsz: usize,
    payload: &[u8],
) -> Result<Vec<u8>> {
    match feature {
        VFIO_DEVICE_FEATURE_MIGRATION | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE => {
            let len = DEVICE_FEATURE_HDR_SIZE + MIG_FEATURE_DATA_SIZE;
            if argsz < len {
                return Err(Errno::EINVAL);
            }
            let mut reply = Vec::with_capacity(len);
            reply.extend_from_slice(&(len as u32).to_le_bytes());
            reply.extend_from_slice(&flags.to_le_bytes());
            if feature == VFIO_DEVICE_FEATURE_MIGRATION {
                reply.extend_from_slice(&mig.flags().to_le_bytes());
            } else {
                reply.extend_from_slice(&mig.state().to_le_bytes());
                reply.extend_from_slice(&0u32.to_le_bytes());
            }
            Ok(reply)
        }
        VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT => {
            let hdr = DEVICE_FEATURE_HDR_SIZE + LOGGING_REPORT_SIZE;
            // The reference reads the report fields without checking that
            // the client sent them; a short request is refused here.
            let req = payload.get(..hdr).ok_or(Errno::EINVAL)?;
            let iova = get_u64(req, DEVICE_FEATURE_HDR_SIZE)?;
            let length = get_u64(req, DEVICE_FEATURE_HDR_SIZE + 8)?;
            let page_size = get_u64(req, DEVICE_FEATURE_HDR_SIZE + 16)?;
            let bitmap = dirty_bitmap_size(length, page_size)?;
            let total = u64::try_from(hdr)
                .ok()
                .and_then(|h| h.checked_add(bitmap))
                .ok_or(Errno::EINVAL)?;
            // argsz (a u32) bounds the allocation below.
            if (argsz as u64) < total {
                return Err(Errno::EINVAL);
            }
            let total = usize::try_from(total).map_err(|_| Errno::EINVAL)?;
            let mut reply = vec![0u8; total];
            reply
                .get_mut(..hdr)
                .ok_or(Errno::EINVAL)?
                .copy_from_slice(req);
            set_u32(
                &mut reply,
                0,
                u32::try_from(total).map_err(|_| Errno::EINVAL)?,
            )?;
            let bits = reply.get_mut(hdr..).ok_or(Errno::EINVAL)?;
            log.report(iova, length, page_size, bits)?;
            Ok(reply)
        }
        _ => Err(Errno::EINVAL),
    }
}

fn feature_set(
    mig: &Migration,
    cbs: &dyn MigrationCallbacks,
    log: &dyn DirtyLogging,
    feature: u32,
    payload: &[u8],
) -> Result<()> {
    let data = payload.get(DEVICE_FEATURE_HDR_SIZE..).unwrap_or(&[]);
    match feature {
        VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE => {
            // Only device_state is used (data_fd means nothing over a socket);
            // the reference reads it even when the client did not send it.
            let target = get_u32(data, 0)?;
            mig.set_state(cbs, target)
        }
        VFIO_DEVICE_FEATURE_DMA_LOGGING_START => {
            let page_size = get_u64(data, 0)?;
            let num_ranges = get_u32(data, 8)?;
            // Bytes 12..16 are reserved.
            if data.len() < LOGGING_CONTROL_SIZE || page_size == 0 {
                return Err(Errno::EINVAL);
            }
            let rest = data.get(LOGGING_CONTROL_SIZE..).unwrap_or(&[]);
            let needed = u64::from(num_ranges) * LOGGING_RANGE_SIZE as u64;
            if (rest.len() as u64) < needed {
                return Err(Errno::EINVAL);
            }
            // `needed` fits in `rest`, hence in usize.
            let needed = usize::try_from(needed).map_err(|_| Errno::EINVAL)?;
            let ranges = rest
                .get(..needed)
                .ok_or(Errno::EINVAL)?
                .chunks_exact(LOGGING_RANGE_SIZE)
                .map(|r| Ok((get_u64(r, 0)?, get_u64(r, 8)?)))
                .collect::<Result<Vec<(u64, u64)>>>()?;
            log.start(page_size, &ranges)
        }
        // The stop request's data, if any, carries nothing we need.
        VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP => log.stop(),
        _ => Err(Errno::EINVAL),
    }
}

/// Whether this `VFIO_USER_DEVICE_FEATURE` request needs the device quiesced
/// before it is handled (when the device has a quiesce callback).
///
/// The reference decides on the raw flags: any SET, or any flags with bit 1
/// set (the MIG_DEVICE_STATE index, but also DMA_LOGGING_START/STOP, and a
/// GET of the device state), unless PROBE is set. A payload too short to hold
/// the flags never needs quiescing (the handler refuses it).
pub fn feature_needs_quiesce(payload: &[u8]) -> bool {
    if payload.len() < DEVICE_FEATURE_HDR_SIZE {
        return false;
    }
    let Ok(flags) = get_u32(payload, 4) else {
        return false;
    };
    flags & (VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE) != 0
        && flags & VFIO_DEVICE_FEATURE_PROBE == 0
}
