#!/usr/bin/env python3
# Import graph of the crate's modules (src/, without src/bin) from the
# crate::/super:: paths of non-test code (comments stripped), and its cycles.
# Usage: scripts/import-cycles.py [-v]  (prints "cycles: none" when there are none)
import os,re,sys
root=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),'src')
def modname(path):
    rel=os.path.relpath(path,root)[:-3]
    parts=rel.split('/')
    if parts[-1] in('mod','lib'): parts=parts[:-1]
    return '::'.join(['crate']+parts) if parts else 'crate'
mods={}
for d,_,fs in os.walk(root):
    if os.path.relpath(d,root).startswith('bin'): continue
    for f in fs:
        if f.endswith('.rs'): mods[modname(os.path.join(d,f))]=os.path.join(d,f)
edges={m:set() for m in mods}
def flatten(t):
    # a::b::{c,d::{e,f}} -> a::b::c, a::b::d::e, ...
    i=t.find('{')
    if i<0: return [t]
    pre=t[:i]; depth=0; parts=[]; cur=''
    for ch in t[i+1:t.rfind('}')]:
        if ch=='{': depth+=1
        if ch=='}': depth-=1
        if ch==',' and depth==0: parts.append(cur); cur=''
        else: cur+=ch
    parts.append(cur)
    out=[]
    for q in parts:
        if q: out+=flatten(pre+q)
    return out
for m,p in mods.items():
    src=open(p).read()
    i=src.find('#[cfg(test)]\nmod tests')
    if i>=0: src=src[:i]
    src=re.sub(r'//[^\n]*','',src)
    base = m.split('::')
    paths=[]
    for u in re.finditer(r'\buse\s+([^;]*);',src):
        paths+=flatten(re.sub(r'\s+','',u.group(1)))
    for u in re.finditer(r'(?<![\w:])((?:crate|super)(?:::super)*::[\w:]+)',src):
        paths.append(u.group(1))
    for pth in paths:
        if not (pth.startswith('crate::') or pth.startswith('super::')): continue
        path=[x for x in pth.split('::') if x]
        if path[0]=='crate': cur=['crate']; path=path[1:]
        else:
            cur=list(base)
            while path and path[0]=='super': cur=cur[:-1]; path=path[1:]
        # longest prefix that is a module
        best=None
        for k in range(len(path),-1,-1):
            cand='::'.join(cur+path[:k])
            if cand in mods: best=cand;break
        if best and best!=m and not m.startswith(best+'::') : edges[m].add(best)
# cycles via Tarjan
idx={};low={};st=[];on=set();res=[];c=[0]
def sc(v):
    idx[v]=low[v]=c[0];c[0]+=1;st.append(v);on.add(v)
    for w in edges[v]:
        if w not in idx: sc(w);low[v]=min(low[v],low[w])
        elif w in on: low[v]=min(low[v],idx[w])
    if low[v]==idx[v]:
        comp=[]
        while True:
            w=st.pop();on.discard(w);comp.append(w)
            if w==v:break
        if len(comp)>1: res.append(comp)
sys.setrecursionlimit(10000)
for v in edges:
    if v not in idx: sc(v)
print("cycles:",res if res else "none")
if '-v' in sys.argv:
    for m in sorted(edges): print(m,'->',sorted(edges[m]))
