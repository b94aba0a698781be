// Package store is a storage node's chunk store: the chunks of any number of
// volumes in one file or block device, with a CRC32C per 4 KiB block, driven
// by io_uring (one shard per CPU) with direct I/O. A write completes once it
// is on the device; a flush (fdatasync) makes every write completed before it
// survive power loss; an activity log lets an unclean start recover.
//
// Local is a volume served straight from a store on this machine (torusblk
// serve --store); ShardDriver lets a frontend's io_uring thread run a store's
// shards itself. docs/STORE.md describes the on-disk format.
package store
