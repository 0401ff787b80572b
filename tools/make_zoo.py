"""Assemble a model-zoo entry: copy trained files into spruce_nb/zoo/<entry>/ (fp16 where that halves the size),
and write their sha256, the exact commands that produced them, the quick-retrain commands and the git commit to
spruce_nb/zoo/manifest.json.

Usage: python tools/make_zoo.py SPEC.json
SPEC.json: {"entry": "cxr64", "task": ..., "resolution": 64,
            "files": {"classifier.pt": {"source": PATH, "command": "...", "quick_command": "...", "output": "classifier.pt",
                                        "metrics": {...}, "commit": optional (default: the newest commit older than the file),
                                        "module": optional (a notebook after the demo's whose module declares the command, e.g. "ace")},
                      "gmms.pt": {"keep": true},   # unchanged: keep the file and its manifest record (its sha256 is checked)
                      ...}}
Files of the entry that the spec does not name are removed from the entry's manifest (and the folder).
"""
import sys, json, subprocess, datetime
from pathlib import Path
import torch
from spruce_nb.core import load_checkpoint, save_checkpoint, file_sha256

ROOT = Path(__file__).resolve().parents[1]

def to_fp16(src: Path, dst: Path) -> None:
    "Re-save a spruce_nb checkpoint with fp32 tensors stored as fp16 (loaders cast back to the module's dtype)."
    ck = load_checkpoint(src)
    save_checkpoint(dst, ck.state, kind=ck.kind, config=ck.config, metadata={**ck.metadata, 'stored_fp16': True}, half=True)

def trained_at(path: Path) -> str:
    "The newest commit older than the file: the package version it was trained with (the training itself is not a commit)."
    when = datetime.datetime.fromtimestamp(path.stat().st_mtime).isoformat()
    return subprocess.run(['git', 'rev-list', '-1', f'--before={when}', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()

def main(spec_path):
    spec = json.loads(Path(spec_path).read_text())
    entry = spec['entry']
    out = ROOT / 'spruce_nb' / 'zoo' / entry; out.mkdir(parents=True, exist_ok=True)
    man_path = ROOT / 'spruce_nb' / 'zoo' / 'manifest.json'
    manifest = json.loads(man_path.read_text()) if man_path.exists() else {}
    files, old = {}, manifest.get(entry, {}).get('files', {})
    for name, f in spec['files'].items():
        if f.get('keep'):
            if name not in old or file_sha256(out / name) != old[name]['sha256']:
                raise ValueError(f"{name}: 'keep' needs the file in {out} with the sha256 of its manifest record")
            files[name] = old[name]; print(f'{name}: kept'); continue
        src, dst = Path(f['source']), out / name
        # fp16 unless the file is identity-bound (a generator: its encoder records the hash of its exact weights)
        if f.get('fp16', True): to_fp16(src, dst)
        if not f.get('fp16', True) or dst.stat().st_size > 0.75 * src.stat().st_size:   # fp16 would not halve it: keep the bytes
            dst.write_bytes(src.read_bytes())
        files[name] = dict(sha256=file_sha256(dst), bytes=dst.stat().st_size, kind=load_checkpoint(dst).kind,
                           command=f['command'], quick_command=f['quick_command'], output=f['output'],
                           commit=f.get('commit') or trained_at(src), metrics=f.get('metrics', {}),
                           **({'module': f['module']} if 'module' in f else {}))   # a later notebook's file: its module declares the command
        print(f'{name}: {files[name]["bytes"] / 1e6:.2f} MB sha256 {files[name]["sha256"][:12]}')
    for name in set(old) - set(files):
        (out / name).unlink(missing_ok=True); print(f'{name}: removed')
    manifest[entry] = dict(task=spec['task'], resolution=spec['resolution'], files=files)
    man_path.write_text(json.dumps(manifest, indent=1) + '\n')
    print(f'wrote {man_path}')

if __name__ == '__main__': main(sys.argv[1])
