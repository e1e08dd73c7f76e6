//! Receipts gathered in one transaction, grouped per sender: both stores queue them the same way.

use std::collections::BTreeMap;

use mesh_proto::wire::{DeliveryItem, Receipt, ReceiptBatch};

/// Receipts live as long as a message's default TTL: the sender may be offline for that long.
pub(crate) const RECEIPT_TTL_MS: u64 = 7 * 24 * 60 * 60 * 1000;

/// Most receipts one queued `receipts` item carries.
const RECEIPTS_PER_ITEM: usize = 256;

/// Receipts gathered in one transaction, queued as one item per sender (`receipts`), or `receipt`
/// when there is one: a sender whose 100 messages were acked in one frame gets one delivery, not 100.
#[derive(Default)]
pub(crate) struct ReceiptsBySender(BTreeMap<(String, String), Vec<Receipt>>);

impl ReceiptsBySender {
    /// Adds a receipt for `sender` in `mesh` (both as stored).
    pub(crate) fn push(&mut self, mesh: String, sender: String, receipt: Receipt) {
        self.0.entry((mesh, sender)).or_default().push(receipt);
    }

    /// How many receipts were added.
    pub(crate) fn count(&self) -> u64 {
        self.0.values().map(|r| r.len() as u64).sum()
    }

    /// The items to queue, per (mesh, sender) in order, as `DeliveryItem` JSON.
    pub(crate) fn into_items(self) -> Vec<((String, String), Vec<String>)> {
        self.0
            .into_iter()
            .map(|(to, receipts)| {
                let items = receipts
                    .chunks(RECEIPTS_PER_ITEM)
                    .map(|chunk| {
                        let item = match chunk {
                            [one] => DeliveryItem::Receipt(one.clone()),
                            many => DeliveryItem::Receipts(ReceiptBatch { receipts: many.to_vec() }),
                        };
                        serde_json::to_string(&item).expect("receipts serialise")
                    })
                    .collect();
                (to, items)
            })
            .collect()
    }
}

/// One receipt as an item of its own (`read` receipts are queued one by one).
pub(crate) fn receipt_json(receipt: Receipt) -> String {
    serde_json::to_string(&DeliveryItem::Receipt(receipt)).expect("receipts serialise")
}
