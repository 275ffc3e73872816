//! Safe views of caller memory. Every raw pointer the C ABI receives passes through here, once,
//! with its NULL and length checks; the rest of the crate sees slices and owned values.
//!
//! A caller's count is a claim, never a slice length by itself: input views are as long as the
//! caller says only after the count is checked against what any real buffer can hold
//! (`isize::MAX` bytes), and output is written through a slice of exactly the bytes written
//! ([`copy_out`]), after comparing their number with the caller's capacity.

use cryptoki_sys::*;

use crate::token::attributes::Template;

/// The result of ABI helpers: a CK_RV on failure.
pub type AbiResult<T> = Result<T, CK_RV>;

/// A caller's count of `T`s, refused with `CKR_ARGUMENTS_BAD` when no buffer can be that large
/// (more than `isize::MAX` bytes): making a slice of it would be undefined behaviour.
fn count_of<T>(n: CK_ULONG) -> AbiResult<usize> {
    let n = usize::try_from(n).map_err(|_| CKR_ARGUMENTS_BAD)?;
    match n.checked_mul(std::mem::size_of::<T>().max(1)) {
        Some(bytes) if bytes <= isize::MAX as usize => Ok(n),
        _ => Err(CKR_ARGUMENTS_BAD),
    }
}

/// The capacity of a caller's output buffer of `n` bytes (checked as [`count_of`] does); only
/// ever compared, never made into a slice.
pub fn capacity(n: CK_ULONG) -> AbiResult<usize> {
    count_of::<u8>(n)
}

/// A caller's count of entries (slots, mechanisms, handles) its array holds: only compared.
pub fn entries(n: CK_ULONG) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Copies `src` to the caller's array `p` that holds `capacity` entries: a slice of exactly
/// `src.len()` entries, made only when they fit. NULL is `CKR_ARGUMENTS_BAD`; more entries than
/// the capacity is `CKR_BUFFER_TOO_SMALL` (callers compare first and report the length).
///
/// # Safety
/// `p` must be NULL or point to `capacity` writable `T`s.
pub unsafe fn copy_out<T: Copy>(p: *mut T, capacity: usize, src: &[T]) -> AbiResult<()> {
    if p.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    if src.len() > capacity {
        return Err(CKR_BUFFER_TOO_SMALL);
    }
    if src.is_empty() {
        return Ok(());
    }
    // SAFETY: non-NULL; src.len() <= capacity entries are writable per the caller's contract, and
    // src.len() entries of a slice we hold cannot exceed isize::MAX bytes.
    let out = unsafe { std::slice::from_raw_parts_mut(p, src.len()) };
    out.copy_from_slice(src);
    Ok(())
}

/// A caller's input buffer. NULL is allowed only with length 0.
///
/// # Safety
/// `p` must be NULL or point to `n` readable bytes that stay valid for `'a`.
pub unsafe fn input<'a>(p: *const CK_BYTE, n: CK_ULONG) -> AbiResult<&'a [u8]> {
    let n = count_of::<u8>(n)?;
    if p.is_null() {
        return if n == 0 {
            Ok(&[])
        } else {
            Err(CKR_ARGUMENTS_BAD)
        };
    }
    // SAFETY: non-NULL, and the caller promises `n` readable bytes.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// A caller's output buffer of `n` bytes that the call fills completely (C_GenerateRandom: the
/// count is what is asked for, so it is also exactly what is written). NULL is an error.
///
/// # Safety
/// `p` must be NULL or point to `n` writable bytes that stay valid for `'a`.
pub unsafe fn output<'a>(p: *mut CK_BYTE, n: CK_ULONG) -> AbiResult<&'a mut [u8]> {
    let n = count_of::<u8>(n)?;
    if p.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-NULL, and the caller promises `n` writable bytes.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, n) })
}

/// Writes one value through a caller's pointer.
///
/// # Safety
/// `p` must be NULL or point to a writable `T`.
pub unsafe fn write<T>(p: *mut T, value: T) -> AbiResult<()> {
    if p.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-NULL and writable per the caller's contract.
    unsafe { p.write(value) };
    Ok(())
}

/// Reads one value through a caller's pointer.
///
/// # Safety
/// `p` must be NULL or point to a readable `T`.
pub unsafe fn read<T: Copy>(p: *const T) -> AbiResult<T> {
    if p.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-NULL and readable per the caller's contract.
    Ok(unsafe { p.read() })
}

/// The mechanism type of a `CK_MECHANISM`; our mechanisms take no parameter.
///
/// # Safety
/// `p` must be NULL or point to a readable `CK_MECHANISM`.
pub unsafe fn mechanism(p: *const CK_MECHANISM) -> AbiResult<CK_MECHANISM_TYPE> {
    // SAFETY: forwarded contract.
    let m = unsafe { read(p) }?;
    if !m.pParameter.is_null() || m.ulParameterLen != 0 {
        return Err(CKR_MECHANISM_PARAM_INVALID);
    }
    Ok(m.mechanism)
}

/// A caller's attribute array, to fill in (C_GetAttributeValue).
///
/// # Safety
/// `p` must be NULL or point to `n` writable `CK_ATTRIBUTE`s valid for `'a`.
pub unsafe fn attributes_mut<'a>(
    p: *mut CK_ATTRIBUTE,
    n: CK_ULONG,
) -> AbiResult<&'a mut [CK_ATTRIBUTE]> {
    let n = count_of::<CK_ATTRIBUTE>(n)?;
    if p.is_null() {
        return if n == 0 {
            Ok(&mut [])
        } else {
            Err(CKR_ARGUMENTS_BAD)
        };
    }
    // SAFETY: non-NULL, and the caller promises `n` attributes.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, n) })
}

/// A caller's input template, copied into owned values.
///
/// # Safety
/// `p` must be NULL or point to `n` readable `CK_ATTRIBUTE`s whose `pValue`s point to
/// `ulValueLen` readable bytes each.
pub unsafe fn template(p: *const CK_ATTRIBUTE, n: CK_ULONG) -> AbiResult<Template> {
    let n = count_of::<CK_ATTRIBUTE>(n)?;
    if p.is_null() {
        return if n == 0 {
            Ok(Vec::new())
        } else {
            Err(CKR_ARGUMENTS_BAD)
        };
    }
    // SAFETY: non-NULL, and the caller promises `n` attributes.
    let attrs = unsafe { std::slice::from_raw_parts(p, n) };
    let mut out = Vec::with_capacity(n);
    for a in attrs {
        // SAFETY: the caller promises `ulValueLen` readable bytes behind `pValue`.
        let v = unsafe { input(a.pValue as *const u8, a.ulValueLen) }?;
        out.push((a.type_, v.to_vec()));
    }
    Ok(out)
}

/// Copies a string into a blank-padded fixed-width field, cutting at a UTF-8 boundary.
pub fn pad(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    let mut end = s.len().min(dst.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    dst[..end].copy_from_slice(&s.as_bytes()[..end]);
}
