//! `Debug` for types that hold what must never be printed (a PIN, key material) or what says
//! nothing when printed (a session, a lock, a library handle, bulk data): [`debug_shows!`] writes
//! only the fields it names and ends in `..`, so a log line or a panic message carries none of
//! the rest.

/// `impl Debug for Type` that shows only the named fields, then `..`:
/// - `debug_shows!(Type: a, b)` shows the fields `a` and `b`;
/// - `debug_shows!(Type: |s| a = s.x.y(), b = s.z)` shows what each expression gives, `s` being
///   the value.
macro_rules! debug_shows {
    ($ty:ident: $($field:ident),* $(,)?) => {
        $crate::redact::debug_shows!($ty: |s| $($field = s.$field),*);
    };
    ($ty:ident: |$s:ident| $($name:ident = $value:expr),* $(,)?) => {
        impl ::std::fmt::Debug for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                #[allow(unused_variables)] // a type that shows no field
                let $s = self;
                f.debug_struct(stringify!($ty))
                    $(.field(stringify!($name), &$value))*
                    .finish_non_exhaustive()
            }
        }
    };
}

pub(crate) use debug_shows;

#[cfg(test)]
mod tests {
    struct Holder {
        path: &'static str,
        secret: [u8; 4],
        inner: Vec<u8>,
    }

    struct Named {
        inner: Vec<u8>,
        secret: [u8; 4],
    }

    debug_shows!(Holder: path);
    debug_shows!(Named: |n| len = n.inner.len());

    #[test]
    fn only_the_named_fields_are_shown() {
        let h = Holder {
            path: "/p",
            secret: *b"k3y!",
            inner: vec![7],
        };
        assert_eq!(format!("{h:?}"), r#"Holder { path: "/p", .. }"#);
        assert_eq!((h.secret, h.inner.len()), (*b"k3y!", 1));
        let n = Named {
            inner: vec![1, 2],
            secret: [0; 4],
        };
        assert_eq!(format!("{n:?}"), "Named { len: 2, .. }");
        assert_eq!(n.secret, [0; 4]);
    }
}
