//! The OpenSSF model-signing format (the `model_signing` tool, v1.0 signatures): a Sigstore
//! bundle (media type v0.3) holding a DSSE envelope over an in-toto statement whose predicate
//! lists every file of the model folder with its SHA-256, and whose one subject is the SHA-256
//! of those digests in order. Signed with the same P-256 key as Shoal's provenance, so anyone
//! with the public key can check a trained model with `model_signing verify key`.
//!
//! What is listed follows the verifier: every regular file under the folder except the
//! signature itself (recorded in `ignore_paths`) and the top-level git files it always skips.
//! A symbolic link is refused, as the verifier refuses it.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::dataset::hex;
use crate::provenance::{PAYLOAD_TYPE, ProvenanceError, SigningKey};

/// Where the signature goes, inside the model folder.
pub const SIGNATURE_FILE: &str = "model.sig";
const MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
const PREDICATE_TYPE: &str = "https://model_signing/signature/v1.0";
/// Skipped by the verifier at the folder's top level, whatever the signature says.
const GIT_PATHS: [&str; 4] = [".git", ".gitattributes", ".github", ".gitignore"];

/// Every file the verifier hashes, as (path relative to `dir` in components, path).
fn files(dir: &Path) -> Result<Vec<(Vec<String>, PathBuf)>, ProvenanceError> {
    fn walk(
        at: &Path,
        rel: &[String],
        out: &mut Vec<(Vec<String>, PathBuf)>,
    ) -> Result<(), ProvenanceError> {
        let io = |e: std::io::Error| ProvenanceError::Io(format!("{}: {e}", at.display()));
        for entry in std::fs::read_dir(at).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let kind = entry.file_type().map_err(io)?;
            if rel.is_empty() && (GIT_PATHS.contains(&name.as_str()) || name == SIGNATURE_FILE) {
                continue;
            }
            let mut parts = rel.to_vec();
            parts.push(name);
            if kind.is_symlink() {
                return Err(ProvenanceError::Io(format!(
                    "{}: a symbolic link; model signatures cover regular files only",
                    path.display()
                )));
            } else if kind.is_dir() {
                walk(&path, &parts, out)?;
            } else if kind.is_file() {
                out.push((parts, path));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, &[], &mut out)?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn file_sha256(path: &Path) -> Result<[u8; 32], ProvenanceError> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| ProvenanceError::Io(format!("{}: {e}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf)
            .map_err(|e| ProvenanceError::Io(format!("{}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

/// Signs the model folder `dir`: writes `dir/model.sig` and returns the bundle.
pub fn sign_dir(key: &SigningKey, dir: &Path) -> Result<Value, ProvenanceError> {
    let mut resources = Vec::new();
    let mut root = Sha256::new();
    for (parts, path) in files(dir)? {
        let digest = file_sha256(&path)?;
        root.update(digest);
        resources.push(json!({
            "name": parts.join("/"), "algorithm": "sha256", "digest": hex(&digest),
        }));
    }
    let name = dir
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    let statement = json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{ "name": name, "digest": { "sha256": hex(&root.finalize()) } }],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {
                "method": "files", "hash_type": "sha256", "allow_symlinks": false,
                "ignore_paths": [SIGNATURE_FILE],
            },
            "resources": resources,
        },
    });
    let payload = serde_json::to_vec(&statement).expect("a statement serialises");
    let sig = key.sign_dsse(&payload)?;
    let bundle = json!({
        "mediaType": MEDIA_TYPE,
        "verificationMaterial": {
            "publicKey": { "hint": hex(&Sha256::digest(key.public_pem().as_bytes())) },
            "tlogEntries": [],
        },
        "dsseEnvelope": {
            "payload": B64.encode(&payload),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{ "sig": B64.encode(sig), "keyid": "" }],
        },
    });
    let out = dir.join(SIGNATURE_FILE);
    std::fs::write(&out, serde_json::to_vec(&bundle).expect("json"))
        .map_err(|e| ProvenanceError::Io(format!("{}: {e}", out.display())))?;
    Ok(bundle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_every_file_but_the_signature_and_git_files_sorted_by_path_components() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in [
            "b",
            "a-b/c",
            "a/b",
            ".gitignore",
            "model.sig",
            "sub/.gitignore",
        ] {
            let p = d.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, f).unwrap();
        }
        let names: Vec<String> = files(d)
            .unwrap()
            .into_iter()
            .map(|f| f.0.join("/"))
            .collect();
        assert_eq!(names, ["a/b", "a-b/c", "b", "sub/.gitignore"]);

        let (key, _, _) = SigningKey::generate().unwrap();
        let bundle = sign_dir(&key, d).unwrap();
        let payload = B64
            .decode(bundle["dsseEnvelope"]["payload"].as_str().unwrap())
            .unwrap();
        let statement: Value = serde_json::from_slice(&payload).unwrap();
        let mut root = Sha256::new();
        for r in statement["predicate"]["resources"].as_array().unwrap() {
            let name = r["name"].as_str().unwrap();
            let digest = Sha256::digest(name.as_bytes());
            assert_eq!(r["digest"], hex(&digest), "{name}");
            root.update(digest);
        }
        assert_eq!(
            statement["subject"][0]["digest"]["sha256"],
            hex(&root.finalize())
        );
    }

    #[test]
    #[cfg(unix)]
    fn a_symbolic_link_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.onnx"), "m").unwrap();
        std::os::unix::fs::symlink("model.onnx", dir.path().join("link")).unwrap();
        let (key, _, _) = SigningKey::generate().unwrap();
        let e = sign_dir(&key, dir.path()).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
    }
}
