//! Sizes for people: `10GiB`, `512Mi`, `1G`, `4096`.

/// Parses a size: a number with an optional unit. Binary units (`Ki`,
/// `KiB` … `Ti`, `TiB`) are powers of 1024, decimal ones (`K`, `KB` … `T`,
/// `TB`) powers of 1000, as in Kubernetes quantities.
pub fn parse(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (try 10GiB, 512Mi or 4096)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" | "k" => 1000,
        "M" | "MB" => 1000u64.pow(2),
        "G" | "GB" => 1000u64.pow(3),
        "T" | "TB" => 1000u64.pow(4),
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        u => {
            return Err(format!(
                "{s:?}: unknown unit {u:?} (use B, KiB, MiB, GiB, TiB or K, M, G, T)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Formats bytes with the largest binary unit that keeps the number exact
/// to one decimal: `10GiB`, `1.5MiB`, `4096B`.
pub fn format(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, size) in UNITS {
        if bytes >= size {
            let v = bytes as f64 / size as f64;
            return if bytes.is_multiple_of(size) {
                format!("{}{name}", bytes / size)
            } else {
                format!("{v:.1}{name}")
            };
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_units() {
        assert_eq!(parse("10GiB"), Ok(10 << 30));
        assert_eq!(parse("512Mi"), Ok(512 << 20));
        assert_eq!(parse("1G"), Ok(1_000_000_000));
        assert_eq!(parse("4096"), Ok(4096));
        assert!(parse("ten").is_err());
        assert!(parse("1XB").is_err());
        assert!(parse("99999999999TiB").is_err());
    }

    #[test]
    fn formats_exact_sizes_without_decimals() {
        assert_eq!(format(10 << 30), "10GiB");
        assert_eq!(format(1536 << 10), "1.5MiB");
        assert_eq!(format(100), "100B");
    }
}
