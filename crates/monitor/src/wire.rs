//! QMP's output: JSON written the way QEMU writes it.
//!
//! One line per message ending in CRLF; `", "` and `": "` separators; ASCII only (everything
//! outside printable ASCII as `\uXXXX` with upper-case hex, surrogate pairs beyond the BMP);
//! doubles as C's `%.17g`; object members in QEMU's hash order (see [`crate::qdict_order`]).

use serde_json::{Number, Value};

use crate::qdict_order;

/// `value` as one QMP output line, CRLF included.
pub fn line(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    write_value(&mut out, value);
    out.extend_from_slice(b"\r\n");
    out
}

/// Append `value` in QEMU's compact JSON form.
pub fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            out.push(b'{');
            let members: Vec<(&String, &Value)> = map.iter().collect();
            let order = qdict_order::order(members.iter().map(|(k, _)| k.as_str()));
            for (n, i) in order.into_iter().enumerate() {
                if n > 0 {
                    out.extend_from_slice(b", ");
                }
                let (key, value) = members[i];
                write_string(out, key);
                out.extend_from_slice(b": ");
                write_value(out, value);
            }
            out.push(b'}');
        }
    }
}

fn write_number(out: &mut Vec<u8>, n: &Number) {
    if let Some(i) = n.as_i64() {
        out.extend_from_slice(i.to_string().as_bytes());
    } else if let Some(u) = n.as_u64() {
        out.extend_from_slice(u.to_string().as_bytes());
    } else if let Some(f) = n.as_f64() {
        out.extend_from_slice(format_g17(f).as_bytes());
    }
}

/// C's `printf("%.17g", x)`.
pub fn format_g17(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x < 0.0 { "-inf" } else { "inf" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0" } else { "0" }.into();
    }
    const P: i32 = 17;
    let sci = format!("{:.*e}", (P - 1) as usize, x);
    let Some((mantissa, exp)) = sci.split_once('e') else {
        return sci;
    };
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..P).contains(&exp) {
        let mantissa = strip_fraction_zeros(mantissa);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        let fixed = format!("{:.*}", (P - 1 - exp) as usize, x);
        strip_fraction_zeros(&fixed).to_string()
    }
}

fn strip_fraction_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            ' '..='~' => out.push(c as u8),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.extend_from_slice(format!("\\u{:04X}", unit).as_bytes());
                }
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(v: &Value) -> String {
        let mut out = Vec::new();
        write_value(&mut out, v);
        String::from_utf8(out).unwrap()
    }

    /// Expected texts are qemu-storage-daemon 10.0.2's echo of the same values.
    #[test]
    fn doubles_print_like_percent_17g() {
        let cases = [
            (0.1, "0.10000000000000001"),
            (1e300, "1.0000000000000001e+300"),
            (1e-7, "9.9999999999999995e-08"),
            (1.2345678901234568e29, "1.2345678901234568e+29"),
            (-1.5, "-1.5"),
            (1e17, "1e+17"),
            (1500.0, "1500"),
            (2.5, "2.5"),
            (18446744073709551616.0, "1.8446744073709552e+19"),
        ];
        for (x, want) in cases {
            assert_eq!(format_g17(x), want, "{x}");
        }
    }

    #[test]
    fn strings_are_ascii_with_upper_case_escapes() {
        assert_eq!(
            text(&json!("/\u{8}\u{c}\n\r\t\"\\\u{7f}é€\u{0}😀")),
            r#""/\b\f\n\r\t\"\\\u007F\u00E9\u20AC\u0000\uD83D\uDE00""#
        );
    }

    #[test]
    fn objects_use_qemus_member_order_and_spacing() {
        assert_eq!(
            text(&json!({"id": {"a": [1, 2.5, null, true]}, "return": {}})),
            r#"{"return": {}, "id": {"a": [1, 2.5, null, true]}}"#
        );
        assert_eq!(
            text(&json!({"error": {"desc": "d", "class": "GenericError"}, "id": 1})),
            r#"{"id": 1, "error": {"class": "GenericError", "desc": "d"}}"#
        );
    }

    #[test]
    fn a_line_ends_in_crlf() {
        assert_eq!(line(&json!({"return": {}})), b"{\"return\": {}}\r\n");
    }
}
