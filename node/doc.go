// Package node is a Torus storage node: a Server answers the chunk protocol
// (internal/wire) over netquic from a store.Store, and Start runs the node's
// life around it: its data directory and identity, recovery after an unclean
// shutdown (marking what may be lost, the incarnation), registration and ring
// membership in etcd, fencing from the volumes' epochs, garbage collection of
// deleted volumes' chunks, removal of dead nodes from the ring and the
// maintenance of volumes no client holds.
package node
