//! Byte sizes and rates written by people: `4096`, `"64KiB"`, `"100MB"`, `"1Gi"`, `"1.5GiB"`.
//!
//! One parser for every config file and command line, with the `bytesize` crate's units,
//! which are Dragonfly's (its client configures rate limits and piece lengths through the
//! same crate): IEC units (`Ki`, `KiB`, `Mi`, `MiB`, …) are powers of 1024, SI units (`K`,
//! `KB`, `M`, `MB`, …) powers of 1000; `B` or no unit means bytes. Case and a space before
//! the unit do not matter. So `64K` is 64,000 bytes and `64Ki` 65,536.

/// Parses a byte size; the error names the input and the accepted forms.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = |why: &str| {
        format!(
            "size {s:?}: {why}; expected a number with an optional unit: B, KB/MB/GB/TB \
             (powers of 1000) or KiB/MiB/GiB/TiB (powers of 1024)"
        )
    };
    if !t.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
        return Err(bad("no number"));
    }
    let n = t
        .parse::<bytesize::ByteSize>()
        .map_err(|e| bad(&e))?
        .as_u64();
    // bytesize saturates on overflow: a result of u64::MAX is only right when written so.
    if n == u64::MAX && t != u64::MAX.to_string() {
        return Err(bad("out of range"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn si_units_are_powers_of_1000_and_iec_units_powers_of_1024() {
        for (text, want) in [
            ("0", 0),
            ("4096", 4096),
            ("64K", 64_000),
            ("64KB", 64_000),
            ("64kb", 64_000),
            ("64Ki", 65_536),
            ("64KiB", 65_536),
            ("100MB", 100_000_000),
            ("256M", 256_000_000),
            ("256MiB", 256 << 20),
            ("1Gi", 1 << 30),
            ("1 gib", 1 << 30),
            ("1GB", 1_000_000_000),
            ("2TiB", 2 << 40),
            ("1.5Mi", 1_572_864),
            ("1.5KiB", 1536),
            ("  7B ", 7),
        ] {
            assert_eq!(parse_size(text), Ok(want), "{text:?}");
        }
    }

    #[test]
    fn bad_sizes_are_errors_that_name_the_input() {
        for text in [
            "",
            "MiB",
            "ten",
            "5 parsecs",
            "-1",
            "-1KiB",
            "99999999999999999999TiB",
        ] {
            match parse_size(text) {
                Ok(n) => panic!("{text:?} parsed as {n}"),
                Err(e) => assert!(e.contains(&format!("{text:?}")), "{e}"),
            }
        }
    }

    #[test]
    fn every_parsed_size_parses_again_from_its_number() {
        for text in ["1.5GiB", "3KB", "0.1MiB", "18446744073709551615"] {
            let n = parse_size(text).expect("valid");
            assert_eq!(parse_size(&n.to_string()), Ok(n), "{text:?}");
        }
    }
}
