//! Unrolls the small constant-count loops of a WGSL kernel before it is compiled.
//!
//! WGSL has no unroll attribute, and a driver that keeps such a loop rolled also keeps the
//! function-scope arrays it indexes (register tiles) in slow local memory. A loop written as
//! `for (var r = 0u; r < RQ; r++) { // @unroll` (on one line; `RQ` a constant the host passes
//! in, or a literal) becomes one `{ let r = 0u; … }` block per iteration, so every index into
//! a register tile is a constant. Unexpanded, the source is the same valid WGSL (the marker is
//! a comment), so the rolled form means the same thing.

/// Expands every marked loop of `src`; `consts` gives the values of the bound names.
pub fn unroll(src: &str, consts: &[(&str, u32)]) -> String {
    let lines: Vec<&str> = src.lines().collect();
    let mut out = String::with_capacity(src.len() * 2);
    expand(&lines, consts, &mut out);
    out
}

fn expand(lines: &[&str], consts: &[(&str, u32)], out: &mut String) {
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if let Some((var, count)) = marked_loop(line, consts) {
            // The body runs to the brace that closes the loop's opening one.
            let mut depth = 1i32;
            let mut end = i + 1;
            while end < lines.len() {
                depth += brace_delta(lines[end]);
                if depth <= 0 {
                    break;
                }
                end += 1;
            }
            if end < lines.len() {
                let mut body = String::new();
                expand(&lines[i + 1..end], consts, &mut body);
                for k in 0..count {
                    out.push_str(&format!("{{ let {var} = {k}u;\n"));
                    out.push_str(&body);
                    out.push_str("}\n");
                }
                i = end + 1;
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
        i += 1;
    }
}

/// `for (var X = 0u; X < N; X++) { // @unroll` with a known `N`: `(X, N)`.
fn marked_loop(line: &str, consts: &[(&str, u32)]) -> Option<(String, u32)> {
    let (code, comment) = line.split_once("//")?;
    if comment.trim() != "@unroll" {
        return None;
    }
    let inner = code.trim().strip_prefix("for (var ")?.strip_suffix('{')?.trim_end().strip_suffix(')')?;
    let mut parts = inner.split(';').map(str::trim);
    let (init, cond, step) = (parts.next()?, parts.next()?, parts.next()?);
    let (var, start) = init.split_once('=').map(|(a, b)| (a.trim(), b.trim()))?;
    let (cvar, bound) = cond.split_once('<').map(|(a, b)| (a.trim(), b.trim()))?;
    if start != "0u" || cvar != var || step != format!("{var}++") {
        return None;
    }
    let count = match bound.strip_suffix('u').and_then(|b| b.parse().ok()) {
        Some(n) => n,
        None => consts.iter().find(|(name, _)| *name == bound)?.1,
    };
    Some((var.to_string(), count))
}

fn brace_delta(line: &str) -> i32 {
    let code = line.split("//").next().unwrap_or("");
    code.matches('{').count() as i32 - code.matches('}').count() as i32
}

#[cfg(test)]
mod tests {
    use super::unroll;

    #[test]
    fn expands_nested_marked_loops_and_leaves_others() {
        let src = "for (var r = 0u; r < RQ; r++) { // @unroll\n    for (var j = 0u; j < 2u; j++) { // @unroll\n        s[r * 2u + j] = 1.0;\n    }\n}\nfor (var u = 0u; u < TX; u++) {\n    x += 1.0;\n}\n";
        let out = unroll(src, &[("RQ", 2)]);
        assert_eq!(out.matches("s[r * 2u + j] = 1.0;").count(), 4, "{out}");
        assert!(out.contains("{ let r = 1u;") && out.contains("{ let j = 1u;"), "{out}");
        assert!(out.contains("for (var u = 0u; u < TX; u++) {"), "unmarked loop changed: {out}");
        assert!(!out.contains("@unroll"), "{out}");
    }

    #[test]
    fn unknown_bound_stays_a_loop() {
        let src = "for (var r = 0u; r < NOPE; r++) { // @unroll\n    x += 1.0;\n}\n";
        assert_eq!(unroll(src, &[]), src);
    }
}
