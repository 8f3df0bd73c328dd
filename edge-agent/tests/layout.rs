//! The linker script fragments that lay out the agent's code (see build.rs): a mistake there
//! does not fail the build, it only quietly costs resident memory, so check them here.

const HOT: &str = include_str!("../link/hot.ld");
const COLD: &str = include_str!("../link/cold.ld");

/// Legacy-mangled names (`_ZN6rustls...`): each segment's number must be its length, or the
/// pattern matches nothing. The first segment is checked (the crate, in the hand-written
/// prefixes); segments holding `$`-escapes (written `?`) are skipped.
#[test]
fn crate_prefixes_carry_their_length() {
    for script in [HOT, COLD] {
        for (i, _) in script.match_indices("._ZN") {
            let rest = &script[i + 4..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            let Ok(len) = digits.parse::<usize>() else {
                continue;
            };
            let Some(segment) = rest.get(digits.len()..digits.len() + len) else {
                continue;
            };
            if segment.contains(['?', '*']) || segment.starts_with('_') {
                continue;
            }
            let next = rest[digits.len() + len..].chars().next();
            assert!(
                next.is_some_and(|c| c == '*' || c.is_ascii_digit()),
                "`_ZN{digits}{segment}...` in a link script: the name is not {len} long"
            );
        }
    }
}

#[test]
fn fragments_insert_one_output_section_each() {
    for (script, section, anchor) in [
        (HOT, ".text.hot : {", "INSERT AFTER .init;"),
        (COLD, ".text.cold : {", "INSERT BEFORE .text;"),
    ] {
        assert_eq!(script.matches(" : {").count(), 1, "{section}");
        assert!(script.contains(section));
        assert!(
            script.trim_end().ends_with(anchor),
            "{section} ends with {anchor}"
        );
        assert_eq!(
            script.matches('{').count(),
            script.matches('}').count(),
            "{section}: braces balance"
        );
    }
    // The profile found the agent's own code, not just the runtime's.
    assert!(HOT.contains("11shoal_agent"));
    assert!(HOT.lines().count() > 500, "hot.ld looks truncated");
}
