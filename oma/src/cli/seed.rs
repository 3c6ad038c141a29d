//! The seed's command-line syntax, kept working for the operators' runbooks.
//!
//! The original Go tool took Go `flag` syntax: `job-recovery -action=scan`,
//! `-action=recover -dry-run=true`, `-action=status`. Runbooks still say so, so [`translate`]
//! rewrites such a command line into the matching subcommand before clap sees it, and the
//! binary prints one line on stderr naming the new form. Go's rules apply: one or two dashes,
//! `-flag=value` or `-flag value`, booleans as `-flag` or `-flag=true|false` (never
//! `-flag false`, which Go reads as a positional argument), `--` ends the flags.
//!
//! `-max-age` is refused: the Go tool failed jobs older than it, on age alone, which this
//! system deliberately never does (a job leaves an active state only on evidence; the
//! silence threshold for an unreachable VMA is the OMA's `--stale-threshold-secs`, and
//! `POST /api/v1/recovery/run` takes no threshold per request).

use std::ffi::OsString;

/// A command line in the seed's syntax, rewritten into the subcommand form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translated {
    /// What clap parses instead, the program name first.
    pub args: Vec<String>,
    /// The one line for stderr (without the `job-recovery: ` prefix) that names the new form.
    pub hint: String,
}

/// Why a command line in the seed's syntax cannot be run; the binary exits 2 with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeedSyntaxError {
    /// `-max-age`, which would fail jobs on age alone.
    #[error(
        "-max-age is not supported: this system fails a job only on evidence, never on age \
         alone; the silence threshold for an unreachable VMA is the OMA's \
         --stale-threshold-secs setting"
    )]
    MaxAge,
    /// A flag the seed's syntax does not have here.
    #[error(
        "unknown flag '{0}' in the old -action syntax; use 'job-recovery scan', \
         'job-recovery recover [--dry-run]' or 'job-recovery status' (see job-recovery --help)"
    )]
    UnknownFlag(String),
    /// A flag that takes a value came last, without one.
    #[error("flag needs a value: '{0}'")]
    MissingValue(String),
    /// `-action` named something other than scan, recover or status.
    #[error(
        "unknown -action '{0}': the old syntax had scan, recover and status; use \
         'job-recovery scan', 'job-recovery recover [--dry-run]' or 'job-recovery status'"
    )]
    UnknownAction(String),
    /// A boolean flag with a value Go's `strconv.ParseBool` would refuse too.
    #[error("invalid boolean value '{value}' for '{flag}': use true or false")]
    BadBool {
        /// The flag as written, without its value.
        flag: String,
        /// The value given.
        value: String,
    },
    /// A positional argument, which the seed's syntax never had. Go would have ignored it and
    /// everything after it, silently; here it is an error, since `-dry-run false` would
    /// otherwise be a real run.
    #[error(
        "unexpected argument '{0}' in the old -action syntax (a boolean takes its value after \
         '=', as in -dry-run=false)"
    )]
    Unexpected(String),
    /// An argument that is not UTF-8; the old syntax is only translated from text.
    #[error("an argument is not valid UTF-8")]
    NotUtf8,
}

/// What a flag of the seed's syntax means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flag {
    Action,
    DryRun,
    MaxAge,
    Help,
    /// A global option that takes a value; the new spelling.
    Value(&'static str),
    /// A global boolean option; the new spelling.
    Bool(&'static str),
}

fn flag(name: &str) -> Option<Flag> {
    Some(match name {
        "action" => Flag::Action,
        "dry-run" => Flag::DryRun,
        "max-age" => Flag::MaxAge,
        "h" | "help" => Flag::Help,
        "oma-url" => Flag::Value("--oma-url"),
        "token" => Flag::Value("--token"),
        "token-file" => Flag::Value("--token-file"),
        "json" => Flag::Bool("--json"),
        _ => return None,
    })
}

/// One argument split as Go's `flag` package reads it: dashes, name, inline value.
struct Parsed<'a> {
    dashes: &'a str,
    name: &'a str,
    value: Option<&'a str>,
}

fn parse_flag(arg: &str) -> Option<Parsed<'_>> {
    let rest = arg.strip_prefix('-')?;
    let (dashes, rest) = match rest.strip_prefix('-') {
        Some(rest) => ("--", rest),
        None => ("-", rest),
    };
    let (name, value) = match rest.split_once('=') {
        Some((name, value)) => (name, Some(value)),
        None => (rest, None),
    };
    Some(Parsed {
        dashes,
        name,
        value,
    })
}

/// Whether `arg` is the flag `name` in any of Go's spellings (`-name`, `--name`, `=value`).
fn is_flag(arg: &str, name: &str) -> bool {
    parse_flag(arg).is_some_and(|p| p.name == name)
}

/// Go's `strconv.ParseBool`, which the seed's boolean flags went through.
fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Rewrites `argv` (program name first) when it uses the seed's syntax, that is when an
/// argument is `-action` or `-max-age` in any Go spelling; `None` leaves it to clap as it is.
pub fn translate(argv: &[OsString]) -> Result<Option<Translated>, SeedSyntaxError> {
    let lossy: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let args = lossy.get(1..).unwrap_or_default();
    let flags_end = args.iter().position(|a| a == "--").unwrap_or(args.len());
    let flags = &args[..flags_end];
    // -max-age is refused wherever it is, so that an operator who adds it to the new form
    // learns why as well, rather than reading clap's "unexpected argument".
    if flags.iter().any(|a| is_flag(a, "max-age")) {
        return Err(SeedSyntaxError::MaxAge);
    }
    if !flags.iter().any(|a| is_flag(a, "action")) {
        return Ok(None);
    }
    if argv.iter().any(|a| a.to_str().is_none()) {
        return Err(SeedSyntaxError::NotUtf8);
    }
    let program = lossy
        .first()
        .cloned()
        .unwrap_or_else(|| "job-recovery".into());
    let seed = SeedLine::parse(args)?;
    Ok(Some(seed.translate(program)?))
}

/// The seed's command line, read.
#[derive(Debug, Default)]
struct SeedLine {
    action: Option<String>,
    dry_run: bool,
    help: bool,
    /// Global options in the new spelling, in the order given.
    globals: Vec<String>,
    /// The arguments of -action and -dry-run as written, for the hint.
    old: Vec<String>,
    /// Global options written with one dash, in the new spelling, for the hint.
    single_dash: Vec<&'static str>,
}

impl SeedLine {
    /// Reads the flags as Go's `flag` package does; the first positional argument is an error
    /// (see [`SeedSyntaxError::Unexpected`]).
    fn parse(args: &[String]) -> Result<Self, SeedSyntaxError> {
        let mut line = SeedLine::default();
        let mut rest = args.iter();
        while let Some(arg) = rest.next() {
            if arg == "--" {
                return match rest.next() {
                    Some(extra) => Err(SeedSyntaxError::Unexpected(extra.clone())),
                    None => Ok(line),
                };
            }
            let parsed = parse_flag(arg)
                .filter(|p| !p.name.is_empty() && !p.name.starts_with(['-', '=']))
                .ok_or_else(|| SeedSyntaxError::Unexpected(arg.clone()))?;
            let written = format!("{}{}", parsed.dashes, parsed.name);
            let kind =
                flag(parsed.name).ok_or_else(|| SeedSyntaxError::UnknownFlag(written.clone()))?;
            let mut value = |takes_next: bool| -> Result<Option<String>, SeedSyntaxError> {
                match (parsed.value, takes_next) {
                    (Some(v), _) => Ok(Some(v.to_owned())),
                    (None, false) => Ok(None),
                    (None, true) => rest
                        .next()
                        .cloned()
                        .map(Some)
                        .ok_or_else(|| SeedSyntaxError::MissingValue(written.clone())),
                }
            };
            match kind {
                Flag::MaxAge => return Err(SeedSyntaxError::MaxAge),
                Flag::Help => line.help = true,
                Flag::Action => {
                    let action = value(true)?.unwrap_or_default();
                    line.old.push(match parsed.value {
                        Some(_) => arg.clone(),
                        None => format!("{arg} {action}"),
                    });
                    line.action = Some(action);
                }
                Flag::DryRun => {
                    line.dry_run = boolean(&written, value(false)?)?;
                    line.old.push(arg.clone());
                }
                Flag::Value(new) => {
                    let v = value(true)?.unwrap_or_default();
                    line.globals.push(format!("{new}={v}"));
                    line.note_dashes(parsed.dashes, new);
                }
                Flag::Bool(new) => {
                    if boolean(&written, value(false)?)? {
                        line.globals.push(new.to_owned());
                    }
                    line.note_dashes(parsed.dashes, new);
                }
            }
        }
        Ok(line)
    }

    fn note_dashes(&mut self, dashes: &str, new: &'static str) {
        if dashes == "-" && !self.single_dash.contains(&new) {
            self.single_dash.push(new);
        }
    }

    /// The subcommand form and the hint. `-dry-run` only means something to `recover`; with
    /// scan and status, which change nothing anyway, it is dropped.
    fn translate(self, program: String) -> Result<Translated, SeedSyntaxError> {
        let action = self.action.unwrap_or_default();
        let subcommand = match action.as_str() {
            "scan" | "recover" | "status" => action.clone(),
            _ => return Err(SeedSyntaxError::UnknownAction(action)),
        };
        let mut new = vec![subcommand];
        if action == "recover" && self.dry_run {
            new.push("--dry-run".into());
        }
        let mut hint = format!(
            "'{}' is the old syntax; use 'job-recovery {}'",
            self.old.join(" "),
            new.join(" ")
        );
        if !self.single_dash.is_empty() {
            hint.push_str(&format!(
                " (options take two dashes: {})",
                self.single_dash.join(", ")
            ));
        }
        let mut args = vec![program];
        args.extend(self.globals);
        args.extend(new);
        if self.help {
            args.push("--help".into());
        }
        Ok(Translated { args, hint })
    }
}

/// A boolean flag's value: absent means true, as in Go.
fn boolean(flag: &str, value: Option<String>) -> Result<bool, SeedSyntaxError> {
    match value {
        None => Ok(true),
        Some(v) => parse_bool(&v).ok_or_else(|| SeedSyntaxError::BadBool {
            flag: flag.to_owned(),
            value: v,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(line: &str) -> Result<Option<Translated>, SeedSyntaxError> {
        let argv: Vec<OsString> = std::iter::once("job-recovery")
            .chain(line.split_whitespace())
            .map(OsString::from)
            .collect();
        translate(&argv)
    }

    /// The translated arguments after the program name, space-separated.
    fn args(line: &str) -> String {
        let t = run(line)
            .unwrap_or_else(|e| panic!("{line}: {e}"))
            .unwrap_or_else(|| panic!("{line}: not translated"));
        assert_eq!(t.args[0], "job-recovery");
        t.args[1..].join(" ")
    }

    #[test]
    fn the_runbooks_command_lines_become_subcommands() {
        for (old, new) in [
            ("-action=scan", "scan"),
            ("-action=recover -dry-run=true", "recover --dry-run"),
            ("-action=recover", "recover"),
            ("-action=status", "status"),
            ("--action scan", "scan"),
            ("-action scan", "scan"),
            ("--action=status", "status"),
            ("-action recover -dry-run", "recover --dry-run"),
            ("--dry-run -action=recover", "recover --dry-run"),
            ("-action=recover --dry-run=false", "recover"),
            ("-action=recover -dry-run=1", "recover --dry-run"),
            ("-action=recover -dry-run=F", "recover"),
            ("-action=recover -dry-run -dry-run=false", "recover"),
            ("-action=scan -action=status", "status"),
            // scan and status change nothing: -dry-run is dropped, not an error.
            ("-action=scan -dry-run", "scan"),
            ("-action=status -dry-run=true", "status"),
            ("-action=scan --", "scan"),
            ("-action=scan -h", "scan --help"),
            ("-help -action=status", "status --help"),
        ] {
            assert_eq!(args(old), new, "{old}");
        }
    }

    #[test]
    fn global_options_in_every_spelling_come_first() {
        for (old, new) in [
            (
                "-oma-url=http://o:1 -action=scan",
                "--oma-url=http://o:1 scan",
            ),
            (
                "-oma-url http://o:1 -action=scan",
                "--oma-url=http://o:1 scan",
            ),
            (
                "--oma-url http://o:1 -action=scan",
                "--oma-url=http://o:1 scan",
            ),
            (
                "-action=status --oma-url=http://o:1",
                "--oma-url=http://o:1 status",
            ),
            ("-token=t -action=scan", "--token=t scan"),
            ("-token -dashed -action=scan", "--token=-dashed scan"),
            (
                "-token-file /etc/t -action=status",
                "--token-file=/etc/t status",
            ),
            ("-action=status -json", "--json status"),
            ("-action=status -json=true", "--json status"),
            ("-action=status -json=false", "status"),
            (
                "-json -token-file=/f -oma-url=u -action=recover -dry-run",
                "--json --token-file=/f --oma-url=u recover --dry-run",
            ),
        ] {
            assert_eq!(args(old), new, "{old}");
        }
    }

    #[test]
    fn the_hint_names_the_new_form_and_never_a_value_of_an_option() {
        for (old, hint) in [
            (
                "-action=scan",
                "'-action=scan' is the old syntax; use 'job-recovery scan'",
            ),
            (
                "-action=recover -dry-run=true",
                "'-action=recover -dry-run=true' is the old syntax; use 'job-recovery recover \
                 --dry-run'",
            ),
            (
                "--action recover",
                "'--action recover' is the old syntax; use 'job-recovery recover'",
            ),
            (
                "-token=secret -oma-url=u -action=status -json",
                "'-action=status' is the old syntax; use 'job-recovery status' (options take \
                 two dashes: --token, --oma-url, --json)",
            ),
            (
                "--token secret -action=status",
                "'-action=status' is the old syntax; use 'job-recovery status'",
            ),
        ] {
            let t = run(old).unwrap().unwrap();
            assert_eq!(t.hint, hint, "{old}");
            assert!(!t.hint.contains("secret"));
        }
    }

    #[test]
    fn the_new_syntax_is_left_to_clap() {
        for line in [
            "",
            "scan",
            "recover --dry-run",
            "--oma-url http://o:1 status --json",
            "-h",
            "jobs --status replicating",
            "create --id x -- -action=scan",
        ] {
            assert_eq!(run(line), Ok(None), "{line}");
        }
    }

    #[test]
    fn what_the_old_syntax_cannot_mean_is_refused() {
        use SeedSyntaxError::*;
        for (line, error) in [
            ("-action=scan -max-age=60", MaxAge),
            ("-max-age 60 -action=recover", MaxAge),
            ("--max-age=60", MaxAge),
            ("scan --max-age=60", MaxAge),
            ("-action=scan -verbose", UnknownFlag("-verbose".into())),
            ("-action=scan --job-id=x", UnknownFlag("--job-id".into())),
            ("-action=scan ---x", Unexpected("---x".into())),
            ("-action", MissingValue("-action".into())),
            ("-action=scan -oma-url", MissingValue("-oma-url".into())),
            ("-action=cleanup", UnknownAction("cleanup".into())),
            ("-action=", UnknownAction(String::new())),
            (
                "-action=recover -dry-run=yes",
                BadBool {
                    flag: "-dry-run".into(),
                    value: "yes".into(),
                },
            ),
            ("-action=recover -dry-run false", Unexpected("false".into())),
            ("scan -action=scan", Unexpected("scan".into())),
            ("-action=scan -- extra", Unexpected("extra".into())),
        ] {
            assert_eq!(run(line), Err(error), "{line}");
        }
    }

    #[test]
    fn refusals_name_the_flag_and_the_new_syntax() {
        let max_age = SeedSyntaxError::MaxAge.to_string();
        assert!(max_age.contains("-max-age") && max_age.contains("--stale-threshold-secs"));
        let unknown = SeedSyntaxError::UnknownFlag("-verbose".into()).to_string();
        assert!(unknown.contains("'-verbose'") && unknown.contains("job-recovery recover"));
    }
}
