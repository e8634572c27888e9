//! `vfuctl migrate`'s options: parsing `--set`, `--compare` and the rest.

use std::time::Duration;

use super::super::cli::{parse_region, parse_u64, parse_usize, Failure, Parsed};

use super::*;

/// `--set REGION:OFFSET=VALUE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SetSpec {
    pub(super) text: String,
    pub(super) region: u32,
    pub(super) offset: u64,
    pub(super) value: u32,
}

/// `--compare REGION:OFFSET:LEN`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct CompareSpec {
    pub(super) text: String,
    pub(super) region: u32,
    pub(super) offset: u64,
    pub(super) len: usize,
}

#[derive(Debug)]
pub(super) struct Options {
    pub(super) from: String,
    pub(super) to: String,
    pub(super) mem_mib: u64,
    pub(super) max_rounds: u32,
    pub(super) threshold: u64,
    pub(super) chunk: usize,
    pub(super) sets: Vec<SetSpec>,
    pub(super) compares: Vec<CompareSpec>,
    pub(super) verify: bool,
    pub(super) force: bool,
    pub(super) progress: bool,
    pub(super) json: bool,
    pub(super) timeout: Duration,
}

pub(super) fn parse_set(s: &str) -> Result<SetSpec, Failure> {
    let bad = || Failure::Usage(format!("--set '{s}': expected REGION:OFFSET=VALUE"));
    let (lhs, value) = s.split_once('=').ok_or_else(bad)?;
    let (reg, off) = lhs.split_once(':').ok_or_else(bad)?;
    let value = parse_u64(value)?;
    let value = u32::try_from(value)
        .map_err(|_| Failure::Usage(format!("--set '{s}': VALUE must fit in 32 bits")))?;
    Ok(SetSpec {
        text: s.to_string(),
        region: parse_region(reg)?,
        offset: parse_u64(off)?,
        value,
    })
}

pub(super) fn parse_compare(s: &str) -> Result<CompareSpec, Failure> {
    let parts: Vec<&str> = s.split(':').collect();
    let [reg, off, len] = parts.as_slice() else {
        return Err(Failure::Usage(format!(
            "--compare '{s}': expected REGION:OFFSET:LEN"
        )));
    };
    let len = parse_usize(len)?;
    if len == 0 || len > MAX_COMPARE {
        return Err(Failure::Usage(format!(
            "--compare '{s}': LEN must be between 1 and {MAX_COMPARE}"
        )));
    }
    Ok(CompareSpec {
        text: s.to_string(),
        region: parse_region(reg)?,
        offset: parse_u64(off)?,
        len,
    })
}

pub(super) fn parse_options(p: &Parsed) -> Result<Options, Failure> {
    if !p.positionals.is_empty() {
        return Err(Failure::Usage(format!(
            "migrate takes no positional arguments (got '{}'); use --from and --to",
            p.positionals[0]
        )));
    }
    let from = p
        .value("from")
        .ok_or_else(|| Failure::Usage("migrate needs --from SOCKET".into()))?;
    let to = p
        .value("to")
        .ok_or_else(|| Failure::Usage("migrate needs --to SOCKET".into()))?;
    if from == to {
        return Err(Failure::Usage(
            "--from and --to name the same socket".into(),
        ));
    }
    let mem_mib = p.value("guest-mem-mib").map_or(Ok(0), parse_u64)?;
    if mem_mib > MAX_GUEST_MEM_MIB {
        return Err(Failure::Usage(format!(
            "--guest-mem-mib must be at most {MAX_GUEST_MEM_MIB}"
        )));
    }
    let max_rounds = match p.value("pre-copy-rounds") {
        None => DEFAULT_ROUNDS,
        Some(v) => u32::try_from(parse_u64(v)?)
            .map_err(|_| Failure::Usage("--pre-copy-rounds is too large".into()))?,
    };
    let chunk = match p.value("chunk") {
        None => vfio_user::client::DEFAULT_MAX_SEND_DATA,
        Some(v) => {
            let n = parse_u64(v)?;
            if n == 0 || n > MAX_CHUNK {
                return Err(Failure::Usage(format!(
                    "--chunk must be between 1 and {MAX_CHUNK}"
                )));
            }
            n as usize
        }
    };
    Ok(Options {
        chunk,
        from: from.to_string(),
        to: to.to_string(),
        mem_mib,
        max_rounds,
        threshold: p
            .value("threshold")
            .map_or(Ok(DEFAULT_THRESHOLD), parse_u64)?,
        sets: p
            .values("set")
            .into_iter()
            .map(parse_set)
            .collect::<Result<_, _>>()?,
        compares: p
            .values("compare")
            .into_iter()
            .map(parse_compare)
            .collect::<Result<_, _>>()?,
        verify: p.flag("verify"),
        force: p.flag("force"),
        progress: !p.flag("no-progress"),
        json: p.flag("json"),
        timeout: p.timeout()?,
    })
}
