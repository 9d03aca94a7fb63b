//! Realistic HL7 v2 messages with made-up people; segments end with CR, no trailing CR
//! after the last one unless noted.

/// An ORU^R01 lab result with `obx` observations.
pub fn oru_r01(control_id: &str, mrn: &str, family: &str, given: &str, obx: usize) -> Vec<u8> {
    const TESTS: [(&str, &str, &str, &str, &str); 6] = [
        ("6690-2", "Leukocytes", "7.2", "10*3/uL", "4.5-13.5"),
        ("789-8", "Erythrocytes", "4.6", "10*6/uL", "4.0-5.2"),
        ("718-7", "Hemoglobin", "12.9", "g/dL", "11.5-15.5"),
        ("4544-3", "Hematocrit", "38.1", "%", "35-45"),
        ("777-3", "Platelets", "310", "10*3/uL", "150-450"),
        ("2345-7", "Glucose", "105", "mg/dL", "70-110"),
    ];
    let mut text = format!(
        "MSH|^~\\&|LAB|CITYLAB|OUTPOST|SMITHPEDS|20261123101500||ORU^R01^ORU_R01|{control_id}|P|2.5.1\r\
PID|1||{mrn}^^^SMITHPEDS^MR||{family}^{given}^Q||20150412|F|||12 ELM ST^^SPRINGFIELD^IL^62701||555-0100\r\
PV1|1|O|PEDS^^^SMITHPEDS||||1234^WELBY^MARCUS\r\
ORC|RE|ORD{control_id}|FIL{control_id}\r\
OBR|1|ORD{control_id}|FIL{control_id}|57021-8^CBC W Auto Differential panel^LN|||20261123091000"
    );
    for i in 0..obx {
        let (code, name, value, unit, range) = TESTS[i % TESTS.len()];
        text.push_str(&format!(
            "\rOBX|{}|NM|{code}^{name}^LN||{value}|{unit}|{range}|N|||F",
            i + 1
        ));
    }
    text.into_bytes()
}

/// An ADT message: `event` is `A01` (admit), `A08` (update), …
pub fn adt(control_id: &str, event: &str, mrn: &str, family: &str, given: &str) -> Vec<u8> {
    format!(
        "MSH|^~\\&|PMS|SMITHPEDS|OUTPOST|SMITHPEDS|20261123101600||ADT^{event}^ADT_A01|{control_id}|P|2.5.1\r\
EVN|{event}|20261123101600\r\
PID|1||{mrn}^^^SMITHPEDS^MR||{family}^{given}||20180101|M|||7 OAK AVE^^SPRINGFIELD^IL^62704\r\
PV1|1|O|PEDS^^^SMITHPEDS||||1234^WELBY^MARCUS"
    )
    .into_bytes()
}

/// An ORM^O01 lab order.
pub fn orm_o01(control_id: &str, mrn: &str, family: &str, given: &str) -> Vec<u8> {
    format!(
        "MSH|^~\\&|PMS|SMITHPEDS|LAB|CITYLAB|20261123101700||ORM^O01|{control_id}|P|2.3\r\
PID|1||{mrn}^^^SMITHPEDS^MR||{family}^{given}||20160303|M\r\
ORC|NW|ORD{control_id}\r\
OBR|1|ORD{control_id}||2345-7^Glucose^LN"
    )
    .into_bytes()
}
