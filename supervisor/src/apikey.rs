//! `tandem apikey new NAME [--append FILE]` and `tandem apikey hash NAME`:
//! make an API key and the `API_KEYS_FILE` line that admits it (the file
//! holds the key's SHA-256, never the key).

use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;

use tandem_config::access::{is_key_name, MAX_KEY_NAME};
use tandem_shared::edge::keys::{key_line, new_key, MAX_KEY_BYTES};

const USAGE: &str =
    "usage: tandem apikey new NAME [--append FILE]   a new key (printed once) and its API_KEYS_FILE line
       tandem apikey hash NAME                    the API_KEYS_FILE line for a key read from standard input";

/// Runs `tandem apikey ...`: 0 done, 1 failed, 2 bad usage.
pub fn command(args: &[String]) -> ExitCode {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let outcome = match args.as_slice() {
        ["new", name] => checked(name).and_then(|n| new(n, None)),
        ["new", name, "--append", file] | ["new", "--append", file, name] => {
            checked(name).and_then(|n| new(n, Some(Path::new(file))))
        }
        ["hash", name] => checked(name).and_then(hash),
        _ => Err((2, USAGE.to_string())),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, why)) => {
            eprintln!("tandem: error: {why}");
            ExitCode::from(code)
        }
    }
}

fn checked(name: &str) -> Result<&str, (u8, String)> {
    if is_key_name(name) {
        Ok(name)
    } else {
        Err((2, format!("a key's name is 1 to {MAX_KEY_NAME} of A-Z a-z 0-9 . _ - @ : (it shows in logs and metrics)")))
    }
}

/// A new key on stdout, then its line; with `append`, the line goes into the file instead.
fn new(name: &str, append: Option<&Path>) -> Result<(), (u8, String)> {
    let key = new_key().map_err(|_| (1, "the system's random number generator failed".to_string()))?;
    let line = key_line(&key, name);
    match append {
        Some(file) => {
            append_line(file, &line).map_err(|why| (1, why))?;
            println!("{key}");
            eprintln!(
                "the key above is shown this once: give it to {name}; {} now admits it (tandem picks the change up within 2 s)",
                file.display()
            );
        }
        None => {
            println!("{key}\n{line}");
            eprintln!(
                "first line: the key, shown this once (give it to {name}); second line: add it to API_KEYS_FILE \
                 (tandem picks the change up within 2 s)"
            );
        }
    }
    Ok(())
}

/// The line for a key the operator already has, read from stdin (so it is never in the shell's history).
fn hash(name: &str) -> Result<(), (u8, String)> {
    let mut key = String::new();
    std::io::stdin()
        .take(MAX_KEY_BYTES as u64 + 2)
        .read_to_string(&mut key)
        .map_err(|e| (1, format!("cannot read the key from standard input: {e}")))?;
    let key = key.trim();
    if key.is_empty() || key.len() > MAX_KEY_BYTES || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err((2, format!("a key is 1 to {MAX_KEY_BYTES} visible ASCII characters, on standard input")));
    }
    println!("{}", key_line(key, name));
    Ok(())
}

/// Appends `line` to `file`, creating it readable by its owner only; refuses
/// a file others can read (tandem would refuse it too).
fn append_line(file: &Path, line: &str) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(file)
        .map_err(|e| format!("cannot open {}: {e}", file.display()))?;
    let meta = f.metadata().map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    if !meta.is_file() || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{} is not a regular file only its owner can read (mode {:o}); chmod 600 it first",
            file.display(),
            meta.mode() & 0o777
        ));
    }
    let ends_open = meta.len() > 0 && !std::fs::read(file).map_err(|e| e.to_string())?.ends_with(b"\n");
    let text = if ends_open { format!("\n{line}\n") } else { format!("{line}\n") };
    f.write_all(text.as_bytes()).map_err(|e| format!("cannot write {}: {e}", file.display()))
}
