"""The expert mesh: expert-group replicas, their placement and directory under one control actor, shared by gateways.

`control.MeshControl` is the named control actor (never on the data path); `view.MeshView` is a gateway's view of
the mesh (it picks replicas and calls them directly); `attach.attach_mesh` finds or starts a mesh and attaches.
"""
