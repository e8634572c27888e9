#!/usr/bin/env python3
# Counts `unsafe {` blocks (and `unsafe impl`) under src/, split into non-test code
# (before the first "#[cfg(test)]\nmod tests") and test code (that part, and
# whole files named tests.rs or test_util.rs, which are only included under #[cfg(test)]). Usage: scripts/count-unsafe.py [git-rev] (default: the work tree)
import subprocess,sys,re,collections
import os
rev=sys.argv[1] if len(sys.argv)>1 else 'WORKTREE'
repo=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if rev=='WORKTREE':
    files=subprocess.check_output(['git','-C',repo,'ls-files','src'],text=True).split()
    files=[f for f in files if f.endswith('.rs')]
    files+= [f for f in subprocess.check_output(['git','-C',repo,'ls-files','-o','--exclude-standard','src'],text=True).split() if f.endswith('.rs')]
    get=lambda f: open(f'{repo}/{f}').read()
else:
    files=[f for f in subprocess.check_output(['git','-C',repo,'ls-tree','-r','--name-only',rev,'src'],text=True).split() if f.endswith('.rs')]
    get=lambda f: subprocess.check_output(['git','-C',repo,'show',f'{rev}:{f}'],text=True)
tot=collections.Counter(); per={}
for f in files:
    s=get(f); i=0 if f.endswith(('/tests.rs','/test_util.rs')) else s.find('#[cfg(test)]\nmod tests'); a,b=(s,'') if i<0 else (s[:i],s[i:])
    strip=lambda t: re.sub(r'//[^\n]*','',t)
    a,b=strip(a),strip(b)
    n=(len(re.findall(r'unsafe\s*\{',a)),len(re.findall(r'unsafe\s*\{',b)),len(re.findall(r'unsafe\s+impl',a)))
    per[f]=n; tot['code']+=n[0]; tot['test']+=n[1]; tot['impl']+=n[2]
for f,n in sorted(per.items(), key=lambda x:-sum(x[1][:2])):
    if sum(n): print(f"{n[0]:4d} {n[1]:4d} {n[2]:3d}  {f}")
print(f"total: {tot['code']} blocks in non-test code, {tot['test']} in tests ({tot['code']+tot['test']} all), {tot['impl']} unsafe impl")
